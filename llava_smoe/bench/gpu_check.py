"""One-command GPU check (`scripts/gpu_check.sh`): sized for about 5 minutes on one H100 / H200 (not yet timed on one).

Runs with the machine's own torch and transformers (no virtual environment, no network, no
DeepSpeed / open_clip / flash-attn needed), prints what it found first and skips, with a
message, what that cannot run. Then, in bf16, with random weights:

1. `moe`: forward + backward of one MoE layer (smoe, grouped GEMM) at real sizes (E = 4, 8, 64;
   D = 3072, F = 8192; 16K tokens) against the dense FFN with the same active parameters (width
   k F) and transformers' Qwen3-MoE block with `experts_implementation="grouped_mm"`; TFLOP/s of
   the active FLOPs and the ratio to dense (aim >= 0.70). A forced CompeteSMoE competition step
   (every expert on every token) for E <= 8.
2. `train`: one training step of a CLIP ViT-L/14-336 + Phi-3.5-mini-shaped MoE VLM from the
   architecture files (CompeteSMoE, 4 experts top-2, every other layer; SDPA, or
   flash-attention 2 when importable): tokens/s and MFU (model FLOPs of `llava_smoe.plan`
   over the GPU's dense bf16 peak; aim >= 0.40). Bf16 weights and AdamW state; gradient
   checkpointing only if the step does not fit without.
3. `generate`: decode tokens/s of the same model with its KV cache.

`--smoke` runs every path at tiny sizes (CPU when there is no GPU) in seconds, for tests.
Results: a table on stdout and `--out` JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

VLM_EXPERTS = 4
# Dense bf16 peaks (FLOP/s, no sparsity) by device name, for MFU.
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "transformers": _version("transformers"), "flash_attn": _version("flash-attn") or _version("flash_attn"),
           "deepspeed": _version("deepspeed"), "open_clip": _version("open_clip_torch")}
    env["grouped_mm"] = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    return env


def notes(env: dict[str, Any]) -> list[str]:
    """What this machine cannot run, said once, up front."""
    out = []
    if env["open_clip"] is None:
        out.append("open_clip is not installed: towers are transformers' (HF) CLIP; open_clip towers are not checked")
    if env["deepspeed"] is None:
        out.append("deepspeed is not installed: the ZeRO back ends are not checked here")
    if env["flash_attn"] is None:
        out.append("flash-attn is not importable: attention runs on SDPA")
    if not env["grouped_mm"]:
        out.append("this torch has no grouped_mm: MoE layers run the per-expert loop")
    major = int((env["transformers"] or "0").split(".")[0])
    if major < 5:
        out.append(f"transformers {env['transformers']} < 5: the VLM sections (train, generate) and the transformers "
                   "MoE baseline are skipped (llava_smoe needs transformers 5)")
    return out


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return run


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def moe_section(device: torch.device, sizes: dict[str, int], experts: list[int], repeats: int,
                hf: bool, grouped: bool = True) -> list[dict]:
    from llava_smoe.bench.moe import DenseSwiGLU, _forward_backward, build_hf_block
    from llava_smoe.moe import MoEConfig, MoELayer, configure_moe_schedule

    D, F, T, K = sizes["hidden"], sizes["ffn"], sizes["tokens"], 2
    timed = _timer(device)
    rows = []
    active_flops = 3 * 2 * T * K * 3 * D * F  # forward + backward of the k experts' matmuls
    for E in experts:
        torch.manual_seed(0)
        with torch.device(device):
            dispatch = "grouped" if grouped else "loop"
            smoe = MoELayer(MoEConfig(num_experts=E, top_k=K, router="smoe", dispatch=dispatch), D, F)
            variants: dict[str, torch.nn.Module] = {"dense": DenseSwiGLU(D, K * F), "smoe": smoe}
            if hf and grouped:
                variants["transformers grouped_mm"] = build_hf_block(smoe, "grouped_mm")
            if E <= 8:
                compete = MoELayer(MoEConfig(num_experts=E, top_k=K, router="competesmoe", dispatch=dispatch, router_options={
                    "warmup_fraction": 0.0, "competition_prob": 1.0}), D, F)
                configure_moe_schedule(compete, 10)
                variants["competesmoe competition"] = compete
        for m in variants.values():
            m.to(torch.bfloat16).train()
        x = torch.randn(1, T, D, device=device, dtype=torch.bfloat16)  # [batch, tokens, D]: the HF block wants 3-D
        g = torch.randn_like(x)

        def step(m=None):
            xi = x.detach().requires_grad_()
            _forward_backward(m, xi, g)
            m.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(repeats + 2):  # two untimed rounds; round-robin so a noisy moment hits all
            for name, m in variants.items():
                t = timed(lambda m=m: step(m))
                if r >= 2:
                    times[name].append(t)
        dense = _median(times["dense"])
        for name, ts in times.items():
            t = _median(ts)
            flops = active_flops * (E / K if name == "competesmoe competition" else 1)
            rows.append({"section": "moe", "variant": name, "num_experts": E, "hidden": D, "ffn": F, "tokens": T,
                         "ms": 1e3 * t, "tflops": flops / t / 1e12, "flops_ratio_to_dense": (flops / t) / (active_flops / dense)})
        del variants, smoe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def vlm_config(smoke: bool, lm_layers: int) -> dict[str, Any]:
    vision = {"backend": "hf", "architecture": "clip-vit-large-patch14-336", "feature_layer": -2}
    lm = {"architecture": "phi-3.5-mini-instruct", "config": {"num_hidden_layers": lm_layers}}
    if smoke:
        vision["hf_config"] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
        lm["config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                            vocab_size=512, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return {"vision": vision, "language_model": lm, "projector": {"type": "mlp2x_gelu"}, "image_token_id": 3,
            "moe": {"router": "competesmoe", "num_experts": VLM_EXPERTS, "top_k": 2},
            "moe_placement": {"language_model": "every_other"}, "attn_implementation": "auto", "dtype": "bfloat16"}


def _batch(model, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    vocab, image_id = model.config.text_config.vocab_size, model.config.image_token_id
    tokens = model.vision_tower.num_image_tokens
    ids = torch.randint(4, vocab, (batch, seq), device=device)
    ids[:, 1:1 + tokens] = image_id
    size = model.vision_tower.image_size
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)}


def train_section(model, device: torch.device, batch: int, seq: int, steps: int, peak: float | None) -> dict:
    from llava_smoe.config import parse
    from llava_smoe.moe import collect_aux_losses, configure_moe_schedule
    from llava_smoe.plan import PlanSettings, plan_model
    from llava_smoe.training.config import OptimConfig
    from llava_smoe.training.optim import build_optimizer, build_param_groups

    optim = parse(OptimConfig, {"groups": [{"name": "moe", "patterns": ["projector.*", "language_model.*.mlp.*"],
                                            "lr": 1e-5}]})
    groups, _, _ = build_param_groups(model, optim)
    optimizer = build_optimizer(groups, optim)
    configure_moe_schedule(model, 1000)  # inside the 5% warm-up: router steps, as most steps are
    plan = plan_model(model, PlanSettings(gpus=1, gpu_memory_gb=80, backend="deepspeed", precision="bf16",
                                          micro_batch_size=batch, seq_len=seq))
    flops_per_token = plan["flops"]["per_token"]["router_step"]
    inputs = _batch(model, batch, seq, device)
    timed = _timer(device)
    model.train()

    def step():
        out = model(**inputs)
        (out.loss + sum(collect_aux_losses(model).values())).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    checkpointing = False
    try:
        timed(step)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        checkpointing = True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        timed(step)
    t = _median([timed(step) for _ in range(steps)])
    tokens_per_s = batch * seq / t
    achieved = flops_per_token * tokens_per_s
    row = {"section": "train", "micro_batch": batch, "seq_len": seq, "step_s": t, "tokens_per_s": tokens_per_s,
           "model_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
           "gradient_checkpointing": checkpointing, "attn_implementation": model.config._attn_implementation,
           "parameters": plan["parameters"]["total"], "trainable": plan["parameters"]["trainable"]}
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    model.zero_grad(set_to_none=True)
    return row


@torch.no_grad()
def generate_section(model, device: torch.device, batch: int, prompt: int, new_tokens: int) -> dict:
    model.eval()
    inputs = _batch(model, batch, prompt, device)
    inputs.pop("labels")
    timed = _timer(device)

    def gen(n: int):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    gen(2)  # warm-up
    first = timed(lambda: gen(1))
    full = timed(lambda: gen(new_tokens))
    return {"section": "generate", "batch": batch, "prompt_tokens": prompt, "new_tokens": new_tokens,
            "prefill_s": first, "decode_tokens_per_s": batch * (new_tokens - 1) / max(full - first, 1e-9)}


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


def format_table(result: dict) -> str:
    lines = ["| section | variant | E | ms / step | TFLOP/s | vs dense | tokens/s | MFU |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["section"] == "moe":
            lines.append(f"| moe | {r['variant']} | {r['num_experts']} | {r['ms']:.2f} | {r['tflops']:.1f} | "
                         f"{r['flops_ratio_to_dense']:.2f} | | |")
        elif r["section"] == "train":
            mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "n/a"
            lines.append(f"| train | micro-batch {r['micro_batch']} x {r['seq_len']}, {r['attn_implementation']}"
                         f"{', checkpointing' if r['gradient_checkpointing'] else ''} | {VLM_EXPERTS} | {1e3 * r['step_s']:.0f} | "
                         f"{r['model_tflops']:.1f} | | {r['tokens_per_s']:.0f} | {mfu} |")
        else:
            lines.append(f"| generate | batch {r['batch']}, {r['new_tokens']} new tokens | {VLM_EXPERTS} | | | | "
                         f"{r['decode_tokens_per_s']:.0f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every code path, seconds (CPU if no GPU)")
    parser.add_argument("--lm-layers", type=int, default=16, help="Phi-3.5-mini layers of the VLM (full width; 32 is its depth)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    parser.add_argument("--sections", default="moe,train,generate")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print("found: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    skipped = notes(env)
    for line in skipped:
        print(f"note: {line}")
    if device.type == "cpu" and not args.smoke:
        print("error: no CUDA device; run with --smoke for the tiny CPU run", flush=True)
        return 2
    has_tf5 = int((env["transformers"] or "0").split(".")[0]) >= 5
    sections = args.sections.split(",")
    rows: list[dict] = []
    started = time.perf_counter()
    if "moe" in sections:
        sizes = {"hidden": 64, "ffn": 128, "tokens": 256} if args.smoke else {"hidden": 3072, "ffn": 8192, "tokens": 16384}
        rows += moe_section(device, sizes, [4, 8] if args.smoke else [4, 8, 64], 2 if args.smoke else 10, hf=has_tf5,
                            grouped=env["grouped_mm"])
    if has_tf5 and ("train" in sections or "generate" in sections):
        from llava_smoe.model import build_model

        torch.manual_seed(0)
        with torch.device(device):
            model = build_model(vlm_config(args.smoke, 2 if args.smoke else args.lm_layers))
        if "train" in sections:
            rows.append(train_section(model, device, 2 if args.smoke else args.micro_batch,
                                      40 if args.smoke else args.seq_len, 1 if args.smoke else 3,
                                      peak_flops(env["device"], args.peak_tflops)))
        if "generate" in sections:
            rows.append(generate_section(model, device, 2 if args.smoke else 8, 24 if args.smoke else 640,
                                         4 if args.smoke else 128))
    result = {"environment": env, "notes": skipped, "smoke": args.smoke, "seconds": time.perf_counter() - started,
              "rows": rows}
    print(format_table(result))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
