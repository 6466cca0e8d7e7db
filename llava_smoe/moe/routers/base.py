"""What every router shares: options, the call interface, losses and routing statistics.

A router receives the flattened tokens `x_TD` and the layer's experts and returns the mixed
output `y_TD` plus its aux losses (already multiplied by their coefficients). Token-choice
routers only implement `gate()`; the sorting dispatch is shared. Routers with another way of
running the experts (competition, token mixing) override `forward()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llava_smoe.config import Config, invalid

from ..experts import GroupedExperts, dispatch_topk

if TYPE_CHECKING:
    from ..config import MoEConfig

NUM_TOKEN_GROUPS = 2  # routing statistics are split by token modality: 0 = text, 1 = image
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over data-parallel ranks


@dataclass
class RouterOptions(Config):
    """A router's options (`MoEConfig.router_options`); each router extends this config.

    balance_count: which assignments the balance loss's expert fractions count: "all" k slots
    of every token (the specification), or "top1", each token's first choice only (what the
    official CompeteSMoE code computes).
    """

    balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    balance_count: Literal["all", "top1"] = "all"

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_coef") and v < 0:
                raise invalid(f.name, f"must be a number >= 0, got {v!r}")

    def check(self, config: "MoEConfig") -> None:
        """Checks against the layer's MoE config (e.g. an option that needs top_k >= 2)."""


@dataclass
class RouteCall:
    """Per-forward context the layer hands its router."""

    impl: str  # "grouped" or "loop"
    batch_shape: tuple[int, ...]  # leading dims of the layer input (B, S) or (T,)
    token_groups_T: torch.Tensor | None = None  # long, 0 = text, 1 = image
    # Long, the owner of each token (e.g. the request a serving batch row belongs to); owners
    # >= num_token_owners (padding) are not counted. Set only together with token_groups_T.
    token_owners_T: torch.Tensor | None = None
    num_token_owners: int = 0


def load_cv(counts_E: torch.Tensor) -> float:
    """Coefficient of variation of the tokens each expert received (0: perfectly even)."""
    counts_E = counts_E.double()
    mean = counts_E.mean().item()
    return counts_E.std(unbiased=False).item() / mean if mean > 0 else 0.0


class RoutingStats:
    """On-device accumulators; read (one host sync) only when statistics are requested."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._acc: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        # Out of place: an accumulator created under inference_mode cannot be updated in place later.
        self._acc[key] = self._acc[key] + value if key in self._acc else value.clone()

    def get(self, key: str) -> torch.Tensor | None:
        return self._acc.get(key)

    def pop(self, key: str) -> torch.Tensor | None:
        return self._acc.pop(key, None)

    def reset(self) -> None:
        self._acc.clear()

    def summary(self) -> dict[str, float | list[float]]:
        acc = {k: v.cpu() for k, v in self._acc.items()}  # the one sync
        out: dict[str, float | list[float]] = {}
        counts_GE = acc.get("tokens_per_expert")
        if counts_GE is not None:
            counts_E = counts_GE.sum(0)
            mean = counts_E.mean().item()
            out["tokens_per_expert"] = counts_E.tolist()
            out["tokens_per_expert_text"] = counts_GE[0].tolist()
            out["tokens_per_expert_image"] = counts_GE[1].tolist()
            out["load_cv"] = load_cv(counts_E)
            out["max_over_mean_load"] = (counts_E.max().item() / mean) if mean > 0 else 0.0
            out["dead_experts"] = int((counts_E == 0).sum().item())
        if "tokens" in acc and "entropy_sum" in acc and acc["tokens"].item() > 0:
            out["router_entropy"] = acc["entropy_sum"].item() / acc["tokens"].item()
            out["router_entropy_normalized"] = out["router_entropy"] / math.log(max(self.num_experts, 2))
        if "train_forwards" in acc and acc["train_forwards"].item() > 0:
            out["competition_rate"] = acc.get("competition_forwards", torch.zeros(())).item() / acc["train_forwards"].item()
        if "agreement_tokens" in acc and acc["agreement_tokens"].item() > 0:
            out["router_agreement"] = acc["agreement_sum"].item() / acc["agreement_tokens"].item()
        if "router_outputs" in acc and acc["router_outputs"].item() > 0:
            out["sparsity"] = acc["zero_outputs"].item() / acc["router_outputs"].item()
        if "evaluated_tokens" in acc and acc["evaluated_tokens"].item() > 0:
            out["expert_evals_per_token"] = acc["expert_evaluations"].item() / acc["evaluated_tokens"].item()
        return out


class Router(nn.Module):
    """Base class. Subclasses set `Options` and implement `forward` (or `gate`)."""

    Options = RouterOptions
    name = "base"

    def __init__(self, hidden_size: int, config: "MoEConfig", layer_idx: int = 0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.layer_idx = layer_idx
        self.opts = config.options
        self.stats = RoutingStats(config.num_experts)

    def forward(self, x_TD: torch.Tensor, experts: GroupedExperts, call: RouteCall):
        raise NotImplementedError

    def aux_loss_names(self) -> set[str]:
        """Every aux loss name this router can return (a step may return a subset)."""
        return {name for name, coef in (("balance", self.opts.balance_coef), ("z_loss", self.opts.z_loss_coef)) if coef}

    @property
    def learning(self) -> bool:
        """Aux losses and per-step measurements exist only while training with gradients."""
        return self.training and torch.is_grad_enabled()

    # Per-optimizer-step state (schedules, adaptive coefficients, biases) changes only here.
    @classmethod
    def on_optimizer_step(cls, routers: list["Router"], step: int, reduce: Reduce) -> None:
        """Called once per optimizer step with every router of this class in the model."""

    @classmethod
    def configure(cls, routers: list["Router"], total_steps: int) -> None:
        """Called once before training with every router of this class in the model."""

    def extra_stats(self) -> dict[str, float]:
        return {}

    # -- shared statistics ---------------------------------------------------------------------
    def record_assignment(self, expert_P: torch.Tensor, token_P: torch.Tensor | None, call: RouteCall) -> None:
        E = self.num_experts
        if call.token_groups_T is not None and token_P is not None:
            key_P = call.token_groups_T[token_P] * E + expert_P
        else:
            key_P = expert_P
        counts = torch.bincount(key_P, minlength=NUM_TOKEN_GROUPS * E)[: NUM_TOKEN_GROUPS * E]
        self.stats.add("tokens_per_expert", counts.view(NUM_TOKEN_GROUPS, E))
        if call.token_owners_T is not None and token_P is not None:
            O, n = call.num_token_owners, call.num_token_owners * NUM_TOKEN_GROUPS * E
            owner_key_P = call.token_owners_T[token_P] * (NUM_TOKEN_GROUPS * E) + key_P
            counts_OGE = torch.bincount(owner_key_P, minlength=n)[:n].view(O, NUM_TOKEN_GROUPS, E)
            self.stats.add("tokens_per_owner_expert", counts_OGE)

    def record_entropy(self, probs_TE: torch.Tensor) -> None:
        p = probs_TE.detach().float()
        entropy_T = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
        self.stats.add("entropy_sum", entropy_T.sum())
        self.stats.add("tokens", torch.tensor(float(p.shape[0]), device=p.device))

    def record_evaluations(self, evaluations: torch.Tensor | float, tokens: int, device: torch.device) -> None:
        """Expert FFN evaluations this forward ran for `tokens` tokens (its compute, in experts)."""
        self.stats.add("expert_evaluations", torch.as_tensor(evaluations, dtype=torch.float64, device=device))
        self.stats.add("evaluated_tokens", torch.tensor(float(tokens), device=device))


# -- losses shared by several routers --------------------------------------------------------------
def balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, count: str = "all") -> torch.Tensor:
    """Switch balance loss E * sum_e f_e * P_e, where f counts all k slots of each token, or with
    count="top1" only its first choice (the official CompeteSMoE code)."""
    T, E = probs_TE.shape
    if count == "top1":
        expert_idx_TK = expert_idx_TK[:, :1]
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / max(expert_idx_TK.numel(), 1)
    P_E = probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


@dataclass
class Gate:
    """A token-choice routing decision: k experts and weights per token."""

    expert_idx_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor  # router distribution (for statistics)
    aux: dict[str, torch.Tensor]


class TokenChoiceRouter(Router):
    """Routers that pick k experts per token from a gate; dispatch is shared."""

    def gate(self, x_TD: torch.Tensor) -> Gate:
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor, experts: GroupedExperts, call: RouteCall):
        g = self.gate(x_TD)
        y_TD = dispatch_topk(experts, x_TD, g.expert_idx_TK, g.weights_TK, call.impl)
        T, K = g.expert_idx_TK.shape
        token_P = torch.arange(T, device=x_TD.device).repeat_interleave(K) if call.token_groups_T is not None else None
        self.record_assignment(g.expert_idx_TK.reshape(-1), token_P, call)
        self.record_entropy(g.probs_TE)
        self.record_evaluations(float(T * K), T, x_TD.device)
        return y_TD, g.aux


def softmax_topk_gate(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax probabilities, top-k experts, and their probabilities renormalised to sum to 1."""
    probs_TE = F.softmax(logits_TE.float(), dim=-1)
    top_p_TK, idx_TK = probs_TE.topk(k, dim=-1)
    weights_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
    return probs_TE, idx_TK, weights_TK
