"""Forward + backward time of one MoE layer per router, against two baselines, in one process.

Baselines:
- `dense`: a SwiGLU FFN with the MoE's *active* parameters (width k * F, gate and up fused).
- `hf`: the MoE block transformers ships for Qwen3-MoE (`Qwen3MoeSparseMoeBlock`), built from a
  tiny config with the same sizes and loaded with the same expert and router weights as our
  `smoe` layer. Before any timing both are run on the same input and must agree (output and
  input gradient); the check is recorded in the `hf` row.

Extra rows: `competesmoe-competition` (every expert on every token: a forced competition step)
and `smoe-loop` (the per-expert loop fallback). Variants are measured round-robin, one call of
each per round with the starting variant rotated, so a noisy moment on a shared machine hits all
of them; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llava_smoe import allocator
from llava_smoe.config import Config

from ..moe import (
    MoEConfig,
    MoELayer,
    available_routers,
    configure_moe_schedule,
    get_router_class,
)
from ..moe.experts import silu_glu
from ..pretrained import DTYPES as CHECKPOINT_DTYPES

DTYPES = tuple(d for d in CHECKPOINT_DTYPES if d != "auto")
HF_EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
DENSE, DENSE_FUSED, HF = "dense", "dense-fused", "hf"
COMPETITION, LOOP = "competesmoe-competition", "smoe-loop"


@dataclass
class MoEBenchConfig(Config):
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 512
    ffn_size: int = 1024
    tokens: int = 4096
    # Tokens are laid out as [batch, tokens // batch, hidden]: Mixture of Tokens mixes across
    # the batch, so the batch must be divisible by its group size.
    batch: int = 8
    routers: list[str] = field(default_factory=available_routers)
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 10
    warmup: int = 2
    hf_experts: str = "eager"
    seed: int = 0

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "hidden_size", "ffn_size", "tokens", "batch", "repeats"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEBenchConfig.{name} must be a positive integer, got {v!r}")
        if self.warmup < 0:
            raise ValueError(f"MoEBenchConfig.warmup must be >= 0, got {self.warmup}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEBenchConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.tokens % self.batch:
            raise ValueError(
                f"MoEBenchConfig.tokens={self.tokens} must be divisible by batch={self.batch} "
                "(tokens are reshaped to [batch, seq, hidden])"
            )
        known = available_routers()
        unknown = sorted(set(self.routers) - set(known))
        if unknown or not self.routers:
            raise ValueError(f"MoEBenchConfig.routers must name registered routers {known}, got {self.routers}")
        if "mot" in self.routers:
            group_size = get_router_class("mot").Options().group_size
            if self.batch % group_size:
                raise ValueError(
                    f"MoEBenchConfig.batch={self.batch} must be divisible by the Mixture-of-Tokens group_size="
                    f"{group_size} (MoT mixes tokens across the batch); change --batch or leave mot out of --routers"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"MoEBenchConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.hf_experts not in HF_EXPERTS_IMPLEMENTATIONS:
            raise ValueError(
                f"MoEBenchConfig.hf_experts must be one of {HF_EXPERTS_IMPLEMENTATIONS}, got {self.hf_experts!r}"
            )
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"MoEBenchConfig.device={self.device!r} but CUDA is not available; use --device cpu")


class DenseSwiGLU(nn.Module):
    """The dense FFN an MoE with top-k of width-F experts is compared with: width k * F, gate and
    up in one matmul, written as transformers' FFNs are (`fused=True`: the experts' SwiGLU)."""

    def __init__(self, hidden_size: int, ffn_size: int, fused: bool = False) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_size, bias=False)
        self.down = nn.Linear(ffn_size, hidden_size, bias=False)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if self.fused:
            return self.down(silu_glu(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def build_hf_block(smoe: MoELayer, hf_experts: str) -> nn.Module:
    """transformers' Qwen3-MoE block with `smoe`'s router and expert weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    E, D = smoe.config.num_experts, smoe.hidden_size
    hf_config = Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=smoe.ffn_size, num_experts=E,
        num_experts_per_tok=smoe.config.top_k, norm_topk_prob=True, hidden_act="silu",
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, vocab_size=8,
        experts_implementation=hf_experts,
    )
    block = Qwen3MoeSparseMoeBlock(hf_config)
    with torch.no_grad():
        # Ours computes x @ W ([E, D, 2F], gate then up); transformers computes x @ W.T ([E, 2F, D]).
        block.experts.gate_up_proj.copy_(smoe.experts.w_gate_up_EDF2.transpose(1, 2))
        block.experts.down_proj.copy_(smoe.experts.w_down_EFD.transpose(1, 2))
        block.gate.weight.copy_(smoe.router.weight_ED)
    return block.to(smoe.experts.w_gate_up_EDF2.device)


def _forward_backward(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """One training step's worth of work: forward, then backward including the layer's aux losses."""
    y = module(x)
    outputs, grads = [y], [grad_out]
    if isinstance(module, MoELayer):
        aux = module.pop_aux_losses()
        outputs += list(aux.values())
        grads += [torch.ones_like(v) for v in aux.values()]
    torch.autograd.backward(outputs, grads)
    return y


def check_hf_equivalence(smoe: MoELayer, hf_block: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict:
    """Same output and input gradient from our SMoE layer and transformers' block (fp32)."""
    results = []
    for module in (smoe, hf_block):
        x_in = x.detach().float().requires_grad_()
        y = _forward_backward(module, x_in, grad_out.float())
        results.append((y.detach(), x_in.grad))
        module.zero_grad(set_to_none=True)
    (y_ours, gx_ours), (y_hf, gx_hf) = results
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-4, atol=1e-5, msg="smoe and transformers outputs differ")
    torch.testing.assert_close(gx_ours, gx_hf, rtol=1e-4, atol=1e-5, msg="smoe and transformers input gradients differ")
    return {
        "reference": "smoe",
        "passed": True,
        "max_abs_diff_output": (y_ours - y_hf).abs().max().item(),
        "max_abs_diff_input_grad": (gx_ours - gx_hf).abs().max().item(),
    }


@dataclass
class Variant:
    name: str
    description: str
    module: nn.Module


def build_variants(cfg: MoEBenchConfig) -> tuple[list[Variant], MoELayer]:
    """All variants in fp32 on the device (the smoe layer is returned for the equivalence check)."""
    device = torch.device(cfg.device)
    E, K, D, Fd = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.ffn_size

    def moe(router: str, router_options: dict | None = None, dispatch: str = "auto") -> MoELayer:
        torch.manual_seed(cfg.seed + 1)  # same router initialisation wherever shapes agree
        config = MoEConfig(num_experts=E, top_k=K, router=router, router_options=router_options or {}, dispatch=dispatch)
        layer = MoELayer(config, D, Fd).to(device)
        layer.experts.load_state_dict(smoe.experts.state_dict())
        return layer

    torch.manual_seed(cfg.seed)
    smoe = MoELayer(MoEConfig(num_experts=E, top_k=K, router="smoe"), D, Fd).to(device)
    variants = [
        Variant(DENSE, f"dense SwiGLU FFN, width k*F = {K * Fd}", DenseSwiGLU(D, K * Fd).to(device)),
        Variant(DENSE_FUSED, "the same with the experts' SwiGLU (no gradient concatenation)",
                DenseSwiGLU(D, K * Fd, fused=True).to(device)),
        Variant(HF, f"transformers Qwen3MoeSparseMoeBlock, experts_implementation={cfg.hf_experts}",
                build_hf_block(smoe, cfg.hf_experts)),
    ]
    for router in cfg.routers:
        if router == "smoe":
            variants.append(Variant("smoe", f"MoELayer router=smoe dispatch={smoe.impl}", smoe))
        elif router == "competesmoe":
            # The router policy: competition never drawn.
            layer = moe("competesmoe", {"competition_prob": 0.0})
            configure_moe_schedule(layer, total_steps=cfg.warmup + cfg.repeats)
            variants.append(Variant(router, "MoELayer router=competesmoe, router step (no competition)", layer))
        else:
            layer = moe(router)
            variants.append(Variant(router, f"MoELayer router={router} dispatch={layer.impl}", layer))
    competition = moe("competesmoe", {"warmup_fraction": 0.0, "competition_prob": 1.0})
    configure_moe_schedule(competition, total_steps=cfg.warmup + cfg.repeats)
    variants.append(Variant(COMPETITION, "MoELayer router=competesmoe, forced competition step (all E experts)", competition))
    variants.append(Variant(LOOP, "MoELayer router=smoe dispatch=loop (per-expert loop)", moe("smoe", dispatch="loop")))
    return variants, smoe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each step, measured round-robin (warm-up rounds dropped)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]  # rotate the start so no variant always runs first
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _ratios(num: list[float], den: list[float]) -> list[float]:
    return sorted(a / b for a, b in zip(num, den))


def median_interval(sorted_values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median: the order statistics j and n-1-j (0-based),
    with j the largest count whose binomial(n, 1/2) tail P(X <= j) is within (1 - confidence) / 2
    (the whole range when even that is not: n < 6 at 95%)."""
    n = len(sorted_values)
    tail, j, cumulative = (1 - confidence) / 2, 0, 0.0
    for i in range(n // 2):
        cumulative += math.comb(n, i) / 2**n
        if cumulative > tail:
            break
        j = i
    return sorted_values[j], sorted_values[n - 1 - j]


def _quartiles(v: list[float]) -> tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]


def run_moe_bench(cfg: MoEBenchConfig) -> list[dict]:
    """Build every variant, check the transformers baseline, time them; one row per variant."""
    import transformers

    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    variants, smoe = build_variants(cfg)
    for v in variants:
        v.module.train()

    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.tokens // cfg.batch, cfg.hidden_size)
    x = torch.randn(shape, generator=gen).to(device)
    grad_out = torch.randn(shape, generator=gen).to(device)
    hf_block = next(v.module for v in variants if v.name == HF)
    equivalence = check_hf_equivalence(smoe, hf_block, x, grad_out)

    x, grad_out = x.to(dtype), grad_out.to(dtype)
    for v in variants:
        v.module.to(dtype)

    def step(module: nn.Module) -> Callable[[], None]:
        def fn() -> None:
            x_in = x.detach().requires_grad_()
            _forward_backward(module, x_in, grad_out)
            module.zero_grad(set_to_none=True)

        return fn

    times = time_interleaved({v.name: step(v.module) for v in variants}, cfg.repeats, cfg.warmup, device)
    competition = next(v.module for v in variants if v.name == COMPETITION)
    rate = competition.routing_stats().get("competition_rate")
    if rate != 1.0:
        raise RuntimeError(f"the forced competition variant competed on a fraction {rate} of its forwards, not all")

    setup = {
        "num_experts": cfg.num_experts, "top_k": cfg.top_k, "hidden_size": cfg.hidden_size, "ffn_size": cfg.ffn_size,
        "tokens": cfg.tokens, "batch": cfg.batch, "dtype": cfg.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "repeats": cfg.repeats, "warmup": cfg.warmup,
        "malloc": allocator.mode(), "torch": torch.__version__, "transformers": transformers.__version__,
    }
    rows = []
    for v in variants:
        t = times[v.name]
        p25, p75 = _quartiles(t)
        to_dense = _ratios(t, times[DENSE])  # per round: a slow moment slows both alike
        r25, r75 = _quartiles(to_dense)
        row = {
            "router": v.name,
            "description": v.description,
            "ms": 1e3 * statistics.median(t),
            "ms_p25": 1e3 * p25,
            "ms_p75": 1e3 * p75,
            "ms_min": 1e3 * min(t),
            "ms_max": 1e3 * max(t),
            "ratio_to_dense": statistics.median(to_dense),
            "ratio_to_dense_p25": r25,
            "ratio_to_dense_p75": r75,
            "ratio_to_dense_ci95": list(median_interval(to_dense)),
            "ratio_to_hf": statistics.median(_ratios(t, times[HF])),
            **setup,
        }
        if v.name == HF:
            row["equivalence"] = equivalence
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| router | ms (median) | ms (p25-p75) | x dense (median of rounds) | x dense (p25-p75) | x dense (95% CI) | x hf |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["ratio_to_dense_ci95"]
        lines.append(
            f"| {r['router']} | {r['ms']:.1f} | {r['ms_p25']:.1f}-{r['ms_p75']:.1f} | {r['ratio_to_dense']:.3f} "
            f"| {r['ratio_to_dense_p25']:.3f}-{r['ratio_to_dense_p75']:.3f} | {lo:.3f}-{hi:.3f} | {r['ratio_to_hf']:.2f} |"
        )
    return "\n".join(lines)


__all__ = [
    "DenseSwiGLU",
    "MoEBenchConfig",
    "build_hf_block",
    "check_hf_equivalence",
    "markdown_table",
    "run_moe_bench",
    "time_interleaved",
]

