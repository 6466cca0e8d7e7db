"""The plan of a recipe or a model: the numbers of `estimate.py` for one run's settings, and the report."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llava_smoe.config import ConfigError

from .estimate import (
    GiB,
    ZERO_STAGES,
    activation_bytes,
    activations_per_sample,
    competition_tensors,
    max_micro_batch,
    model_shape,
    model_states,
    parameter_table,
    state_bytes,
    training_flops,
    weight_grad_transient,
)
from .resolve import resolve_recipe

# DeepSpeed's defaults for what the JSON may leave out (elements, not bytes).
_ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_max_live_parameters": 1e9,
                  "stage3_max_reuse_distance": 1e9,
                  "stage3_prefetch_bucket_size": 5e7}


@dataclass
class PlanSettings:
    """How the model is trained: back end and precision, GPUs, and the micro-batch's shape."""

    gpus: int
    gpu_memory_gb: float  # GiB of one GPU
    backend: str = "deepspeed"
    precision: str = "bf16"
    micro_batch_size: int = 1
    seq_len: int = 2048
    images_per_sample: int = 1
    headroom: float = 0.1
    expert_parallel: int = 1
    gradient_checkpointing: bool = False
    zero: dict[str, float] = field(default_factory=dict)  # zero_optimization settings of the recipe's JSON
    zero_stage: int | None = None  # the stage the recipe's JSON names

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"--gpus must be >= 1, got {self.gpus}")
        if self.gpu_memory_gb <= 0:
            raise ConfigError(f"--gpu-memory must be > 0 GiB, got {self.gpu_memory_gb}")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"--headroom must lie in [0, 1), got {self.headroom}")
        if self.expert_parallel < 1 or self.gpus % self.expert_parallel:
            raise ConfigError(f"--expert-parallel {self.expert_parallel} must divide --gpus {self.gpus}")
        for name in ("micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images_per_sample < 0:
            raise ConfigError(f"--images must be >= 0, got {self.images_per_sample}")


def plan_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, gpus: int, gpu_memory_gb: float,
                seq_len: int | None = None, images_per_sample: int = 1, micro_batch_size: int | None = None,
                headroom: float = 0.1, expert_parallel: int = 1) -> dict[str, Any]:
    """The plan of one recipe as plain data (bytes, FLOPs); see `format_plan` for a report."""
    resolved = resolve_recipe(path, overrides)
    train = resolved.run.train
    stage, zero = _zero_section(train.deepspeed_config if train.backend == "deepspeed" else None)
    settings = PlanSettings(gpus, gpu_memory_gb, train.backend, train.precision,
                            micro_batch_size or train.micro_batch_size, seq_len or resolved.run.task_config.max_length,
                            images_per_sample, headroom, expert_parallel, train.gradient_checkpointing, zero, stage)
    return {"recipe": str(path), "chain": resolved.chain, **plan_model(resolved.model, settings)}


def plan_model(model, settings: PlanSettings) -> dict[str, Any]:
    """The plan of a `LlavaSmoeForConditionalGeneration` (meta or real; `requires_grad` marks
    what trains) under `settings`."""
    from llava_smoe.moe import MoELayer

    s = settings
    shape = model_shape(model)
    table = parameter_table(model)
    params = sum(c.total for c in table)
    trainable = sum(c.trainable for c in table)
    experts = [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]
    expert_params = sum(p.numel() for p in experts)
    expert_trainable = sum(p.numel() for p in experts if p.requires_grad)

    states = {}
    for stage in ZERO_STAGES:
        # The recipe's JSON holds the buckets of its own stage; the other stage gets DeepSpeed's defaults.
        own = s.zero_stage == {"zero2": 2, "zero3": 3}.get(stage)
        zero = {**_ZERO_DEFAULTS, **(s.zero if own else {})}
        sb = state_bytes(s.backend if stage == "none" else "deepspeed", s.precision)
        states[stage] = model_states(params, trainable, s.gpus, stage, sb, expert_params=expert_params,
                                     expert_trainable=expert_trainable,
                                     expert_parallel=s.expert_parallel if stage == "none" else 1,
                                     largest_block=_largest_fetch(model, zero), zero_config=zero)
    b = activation_bytes(s.precision)
    acts = {ckpt: activations_per_sample(shape, s.seq_len, s.images_per_sample, b, ckpt) for ckpt in (False, True)}
    flops = training_flops(shape, s.seq_len, s.images_per_sample)
    lm_moe = next((layer.moe for layer in shape.lm.layers if layer.moe is not None), None)
    competition = acts[False].competing_layers > 0  # size the micro-batch for the worst step
    usable = s.gpu_memory_gb * GiB * (1 - s.headroom)
    fits = []
    for stage in ZERO_STAGES:
        grads = weight_grad_transient(model, state_bytes(s.backend if stage == "none" else "deepspeed",
                                                         s.precision).grad)
        for ckpt in (False, True):
            best = max_micro_batch(usable, states[stage].total, acts[ckpt], grads, competition)
            fits.append({"stage": stage, "checkpointing": ckpt, "model_states_bytes": states[stage].total,
                         "weight_grad_bytes": grads,
                         "activation_bytes": acts[ckpt].peak(s.micro_batch_size, grads, competition),
                         "max_micro_batch": best, "recipe_fits": best >= s.micro_batch_size})
    tokens = s.micro_batch_size * s.seq_len
    return {
        "settings": {**asdict(s), "usable_bytes": usable},
        "parameters": {"components": [asdict(c) for c in table], "total": params,
                       "active": sum(c.active for c in table), "trainable": trainable},
        "model_states": {stage: {**asdict(m), "total": m.total} for stage, m in states.items()},
        "activations_per_sample": {("checkpointing" if ckpt else "no_checkpointing"): asdict(a)
                                   for ckpt, a in acts.items()},
        "competition_tensors": {**competition_tensors(lm_moe, tokens, b), "tokens": tokens} if lm_moe else None,
        "flops": {"per_sample": asdict(flops), "per_token": {k: v / s.seq_len for k, v in asdict(flops).items()
                                                              if k != "expected_competing_layers"}},
        "fit": fits,
    }


def _zero_section(path: str | None) -> tuple[int | None, dict[str, float]]:
    """The ZeRO stage a DeepSpeed JSON names and its bucket settings."""
    if not path:
        return None, {}
    if not Path(path).is_file():
        raise ConfigError(f"train.deepspeed_config: {path} is not a file (a relative path is read from "
                          f"{Path.cwd()}, as training reads it)")
    try:
        section = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"train.deepspeed_config: {path} is not a DeepSpeed JSON object ({exc})") from None
    return section.get("stage"), {k: float(v) for k, v in section.items()
                                  if k in _ZERO_DEFAULTS and isinstance(v, (int, float))}


def _largest_fetch(model, zero: dict[str, float]) -> float:
    """Parameters ZeRO-3 fetches at once: the larger of the largest leaf (an MoE layer is one,
    every expert in it) and the prefetch bucket, averaged with the largest leaf."""
    from llava_smoe.moe import MoELayer

    sizes = []
    inside_moe = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    for module in model.modules():
        if isinstance(module, MoELayer):
            sizes.append(sum(p.numel() for p in module.parameters()))
        elif id(module) not in inside_moe:
            sizes.append(sum(p.numel() for p in module.parameters(recurse=False)))
    largest = max(sizes, default=0)
    return (largest + max(largest, zero["stage3_prefetch_bucket_size"])) / 2


def _gb(n: float) -> str:
    return f"{n / GiB:.2f}"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a text report (GiB)."""
    s = plan["settings"]
    lines = [f"plan of {plan['recipe']} (stages: {' -> '.join(plan['chain'])})",
             f"{s['gpus']} GPU(s) x {s['gpu_memory_gb']:g} GiB ({_gb(s['usable_bytes'])} GiB usable after "
             f"{s['headroom']:.0%} headroom), {s['backend']} back end, {s['precision']}, micro-batch "
             f"{s['micro_batch_size']} x {s['seq_len']} tokens ({s['images_per_sample']} image each)", "",
             "parameters            total      active   trainable"]
    p = plan["parameters"]
    for c in p["components"]:
        lines.append(f"  {c['name']:<34} {_count(c['total']):>9} {_count(c['active']):>9} {_count(c['trainable']):>9}")
    lines.append(f"  {'all':<34} {_count(p['total']):>9} {_count(p['active']):>9} {_count(p['trainable']):>9}")
    lines += ["", "model states per GPU (GiB)   weights  gradients  optimizer  gathered  buckets   total"]
    names = {"none": "no ZeRO", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
    for stage, m in plan["model_states"].items():
        lines.append(f"  {names[stage]:<25} {_gb(m['weights']):>8} {_gb(m['gradients']):>10} {_gb(m['optimizer']):>10}"
                     f" {_gb(m['gathered']):>9} {_gb(m['buckets']):>8} {_gb(m['total']):>7}")
    lines += ["", "activations per sample (GiB)   router step   competition step"]
    for key, a in plan["activations_per_sample"].items():
        label = "gradient checkpointing" if key == "checkpointing" else "no checkpointing"
        lines.append(f"  {label:<27} {_gb(a['router_step']):>11} {_gb(a['competition_step']):>18}"
                     f"   ({a['competing_layers']} competing layer(s))")
    ct = plan["competition_tensors"]
    if ct:
        lines += ["", f"a competing LM MoE layer, micro-batch of {ct['tokens']} tokens: outputs "
                      f"{ct['shape_TED']} {_gb(ct['outputs_TED'])} GiB, hidden {ct['shape_TEF2']} {_gb(ct['hidden_TEF2'])} GiB"]
    f = plan["flops"]["per_token"]
    lines += ["", "training FLOPs per token   router step   competition step   schedule mean",
              f"  {'':<24} {_count(f['router_step']):>11} {_count(f['competition_step']):>18} "
              f"{_count(f['schedule_mean']):>15}",
              f"  expected competing layers per step: {plan['flops']['per_sample']['expected_competing_layers']:.3f}; "
              f"one competing LM layer adds {_count(f['per_competing_layer'])} FLOPs per token", "",
              "largest micro-batch that fits      no checkpointing   gradient checkpointing"]
    for stage in ZERO_STAGES:
        row = {r["checkpointing"]: r for r in plan["fit"] if r["stage"] == stage}
        cells = [f"{r['max_micro_batch']}{'' if r['recipe_fits'] else ' (<' + str(s['micro_batch_size']) + ')'}"
                 for r in (row[False], row[True])]
        lines.append(f"  {names[stage]:<32} {cells[0]:>16} {cells[1]:>24}")
    return "\n".join(lines)

