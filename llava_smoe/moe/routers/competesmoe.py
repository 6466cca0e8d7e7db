"""CompeteSMoE: competition between experts, with a router distilled to imitate it.

On scheduled training steps every expert runs on every token (each exactly once); tokens go to
the k experts with the highest neural response, and the router learns only from a distillation
loss towards the competition's distribution. On all other steps, and always under no_grad or at
inference, the layer is a plain SMoE driven by the router.

The schedule is a pure function of (seed, optimizer step, layer): no per-run buffer and no
broadcast, so every micro-batch of a step and every data-parallel rank agrees, and a resumed or
lengthened run keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from llava_smoe.config import invalid

from . import register_router
from .base import RouteCall, RouterOptions, balance_loss, softmax_topk_gate
from .smoe import SMoERouter

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def schedule_uniform(seed: int, step: int, layer: int) -> float:
    """A uniform draw in [0, 1) determined by (seed, step, layer) alone."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) ^ (layer & _MASK64))
    return (x >> 11) / float(1 << 53)


def neural_response(y_TED: torch.Tensor, affinity: str) -> torch.Tensor:
    """Each expert's response to each token, [T, E]: mean_d softplus(Y) or ||Y||_2 (fp32)."""
    if affinity == "softplus":
        return F.softplus(y_TED.float()).mean(-1)
    return y_TED.float().norm(dim=-1)


def diversity(y_TKD: torch.Tensor, normalization: str = "pairwise") -> torch.Tensor:
    """Cosine similarity of the k selected experts' outputs: the mean over the k(k-1)/2 distinct
    pairs ("pairwise"), or over all k x k entries with the diagonal as zeros ("official", what
    the official CompeteSMoE code computes: (k - 1) / k of the pairwise mean, half at k = 2)."""
    unit_TKD = F.normalize(y_TKD.float(), dim=-1)
    sim_TKK = unit_TKD @ unit_TKD.transpose(1, 2)
    K = sim_TKK.shape[-1]
    i, j = torch.triu_indices(K, K, offset=1, device=y_TKD.device)
    pairs_T = sim_TKK[:, i, j].sum(-1)
    if normalization == "official":
        return (2 * pairs_T / (K * K)).mean()
    return (pairs_T / i.numel()).mean()


def competing_layers(
    seed: int, step: int, num_layers: int, total_steps: int, warmup_fraction: float, prob: float, max_layers: int
) -> list[int]:
    """Indices of the layers that compete on `step` (0-based optimizer step)."""
    if step < warmup_fraction * total_steps:
        return []
    draws = [(schedule_uniform(seed, step, layer), layer) for layer in range(num_layers)]
    winners = sorted(d for d in draws if d[0] < prob)[:max_layers]  # the cap keeps the lowest draws
    return sorted(layer for _, layer in winners)


@dataclass
class CompeteSMoEOptions(RouterOptions):
    distill_coef: float = 0.01
    diversity_coef: float = 0.01
    competition_balance_coef: float = 0.01
    hybrid_coef: float = 0.0
    affinity: Literal["softplus", "l2"] = "softplus"  # "softplus": mean_d softplus(Y); "l2": ||Y||_2 (2024)
    # "pairwise": mean over the distinct pairs; "official": over all k x k with zero diagonal
    diversity_normalization: Literal["pairwise", "official"] = "pairwise"
    warmup_fraction: float = 0.05
    competition_prob: float = 0.05
    max_competing_layers: int = 3
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise invalid("warmup_fraction", f"must be in [0, 1], got {self.warmup_fraction}")
        if not 0.0 <= self.competition_prob <= 1.0:
            raise invalid("competition_prob", f"must be in [0, 1], got {self.competition_prob}")
        if self.max_competing_layers < 0:
            raise invalid("max_competing_layers", f"must be an integer >= 0, got {self.max_competing_layers}")

    def check(self, config) -> None:
        if config.top_k < 2 and self.diversity_coef > 0:
            raise invalid("diversity_coef", "needs top_k >= 2 (it compares pairs of selected experts); set it to 0")


@register_router("competesmoe")
class CompeteSMoERouter(SMoERouter):
    Options = CompeteSMoEOptions

    def __init__(self, hidden_size, config, layer_idx=0):
        super().__init__(hidden_size, config, layer_idx)
        # Persistent so a checkpoint carries the schedule position; set only by the step hooks.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self.schedule_index = -1  # position among the model's competing layers; set by configure()
        self.schedule_size = 0
        self._host_step: int | None = None  # host mirror of `step` so forward never syncs
        self._host_total = 0
        self._decision: tuple[int, bool] | None = None  # (step, competes) cache

    def aux_loss_names(self) -> set[str]:
        o = self.opts
        competition = {"distill": o.distill_coef, "hybrid": o.hybrid_coef, "balance": o.competition_balance_coef,
                       "diversity": o.diversity_coef if self.top_k > 1 else 0.0}
        return super().aux_loss_names() | {name for name, coef in competition.items() if coef}

    # -- schedule ------------------------------------------------------------------------------
    @classmethod
    def configure(cls, routers, total_steps):
        for i, r in enumerate(routers):
            r.schedule_index, r.schedule_size = i, len(routers)
            r.total_steps.fill_(int(total_steps))
            r._host_step = None
            r._host_total = int(total_steps)

    @classmethod
    def on_optimizer_step(cls, routers, step, reduce):
        for r in routers:
            r.step.fill_(int(step))
            r._host_step = int(step)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None

    def competes_now(self) -> bool:
        if self.schedule_index < 0:
            raise RuntimeError(
                "CompeteSMoE router is training but its schedule is not configured: call "
                "llava_smoe.moe.configure_moe_schedule(model, total_steps) before training"
            )
        if self._host_step is None:  # once after (re)loading: a single read of the buffer
            self._host_step = int(self.step.item())
        if self._decision is None or self._decision[0] != self._host_step:
            o = self.opts
            layers = competing_layers(
                o.seed, self._host_step, self.schedule_size, self._host_total,
                o.warmup_fraction, o.competition_prob, o.max_competing_layers,
            )
            self._decision = (self._host_step, self.schedule_index in layers)
        return self._decision[1]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x_TD, experts, call: RouteCall):
        if not self.learning:
            return super().forward(x_TD, experts, call)
        self.stats.add("train_forwards", torch.ones((), device=x_TD.device))
        if not self.competes_now():
            return super().forward(x_TD, experts, call)
        self.stats.add("competition_forwards", torch.ones((), device=x_TD.device))
        return self._compete(x_TD, experts, call)

    def _compete(self, x_TD, experts, call: RouteCall):
        o, K = self.opts, self.top_k
        y_TED = experts.forward_all(x_TD)  # every expert once: E evaluations, reused below
        affinity_TE = neural_response(y_TED, o.affinity)
        top_a_TK, idx_TK = affinity_TE.topk(K, dim=-1)
        weights_TK = top_a_TK / top_a_TK.sum(-1, keepdim=True).clamp_min(1e-12)
        D = y_TED.shape[-1]
        y_TKD = y_TED.gather(1, idx_TK.unsqueeze(-1).expand(-1, -1, D))
        out_TD = (weights_TK.unsqueeze(-1).to(y_TKD.dtype) * y_TKD).sum(1)

        # The router learns to imitate competition; its logits do not enter the output.
        logits_TE = self.logits(x_TD)
        router_probs_TE = F.softmax(logits_TE, dim=-1)
        target_TE = F.softmax(affinity_TE, dim=-1)
        aux = {"distill": o.distill_coef * F.mse_loss(router_probs_TE, target_TE.detach())} if o.distill_coef else {}
        if o.hybrid_coef:
            aux["hybrid"] = o.hybrid_coef * F.mse_loss(
                router_probs_TE.gather(1, idx_TK), target_TE.detach().gather(1, idx_TK)
            )
        if o.diversity_coef and K > 1:
            aux["diversity"] = o.diversity_coef * diversity(y_TKD, o.diversity_normalization)
        if o.competition_balance_coef:
            aux["balance"] = o.competition_balance_coef * balance_loss(target_TE, idx_TK, o.balance_count)

        token_P = (torch.arange(x_TD.shape[0], device=x_TD.device).repeat_interleave(K)
                   if call.token_groups_T is not None else None)  # only needed to split by modality
        self.record_assignment(idx_TK.reshape(-1), token_P, call)
        self.record_entropy(router_probs_TE)
        self.record_evaluations(float(y_TED.shape[0] * y_TED.shape[1]), y_TED.shape[0], x_TD.device)
        with torch.no_grad():
            _, router_idx_TK, _ = softmax_topk_gate(logits_TE, K)
            agree_T = (router_idx_TK.unsqueeze(-1) == idx_TK.unsqueeze(1)).any(-1).float().mean(-1)
            self.stats.add("agreement_sum", agree_T.sum())
            self.stats.add("agreement_tokens", torch.tensor(float(agree_T.shape[0]), device=x_TD.device))
        return out_TD, aux
