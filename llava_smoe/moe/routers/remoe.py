"""ReMoE: ReLU routing with an adaptive, load-balancing-aware L1 penalty.

Expert e is active for a token iff its ReLU gate is positive, so the number of experts per token
varies (dropless). One global lambda, updated once per optimizer step from the measured
sparsity (over layers, micro-batches and ranks), steers sparsity towards 1 - k/E.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_smoe.config import invalid

from ..experts import dispatch_pairs
from . import register_router
from .base import RouteCall, Router, RouterOptions


@dataclass
class ReMoEOptions(RouterOptions):
    balance_coef: float = 0.0  # unused: the L1 term balances load
    z_loss_coef: float = 0.0
    lambda_init: float = 1e-8
    alpha: float = 1.2
    target_sparsity: float | None = None  # default 1 - k/E

    def validate(self) -> None:
        super().validate()
        if self.lambda_init <= 0:
            raise invalid("lambda_init", f"must be > 0, got {self.lambda_init}")
        if self.alpha <= 1.0:
            raise invalid("alpha", f"must be > 1, got {self.alpha}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise invalid("target_sparsity", f"must be in [0, 1), got {self.target_sparsity}")


@register_router("remoe")
class ReMoERouter(Router):
    Options = ReMoEOptions

    def __init__(self, hidden_size, config, layer_idx=0):
        super().__init__(hidden_size, config, layer_idx)
        self.weight_ED = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight_ED, std=0.02)
        o = self.opts
        self.target_sparsity = o.target_sparsity if o.target_sparsity is not None else 1.0 - config.top_k / config.num_experts
        self.register_buffer("l1_lambda", torch.tensor(o.lambda_init, dtype=torch.float32))
        self._pending: torch.Tensor | None = None  # [zero gates, all gates] since the last optimizer step

    def aux_loss_names(self) -> set[str]:
        return {"l1"}

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # lambda spans many orders of magnitude: it stays fp32 whatever the model's dtype.
        if self.l1_lambda.dtype != torch.float32:
            self.l1_lambda = self.l1_lambda.float()
        return self

    def forward(self, x_TD, experts, call: RouteCall):
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        gates_TE = torch.relu(x_TD.float() @ self.weight_ED.float().t())
        active_TE = gates_TE > 0
        token_P, expert_P = active_TE.nonzero(as_tuple=True)
        y_TD = dispatch_pairs(experts, x_TD, token_P, expert_P, gates_TE[token_P, expert_P], call.impl)

        aux = {}
        if self.learning:
            counts_E = active_TE.sum(0).to(gates_TE.dtype)
            f_E = E * counts_E / (K * max(T, 1))  # load share, no gradient
            aux["l1"] = self.l1_lambda * (gates_TE * f_E).sum() / max(T, 1)
            zeros = (~active_TE).sum().to(torch.float64)
            pending = torch.stack([zeros, zeros.new_tensor(float(T * E))])
            self._pending = pending if self._pending is None else self._pending + pending

        self.record_assignment(expert_P, token_P, call)
        self.record_evaluations(expert_P.numel(), T, x_TD.device)
        norm_TE = gates_TE / gates_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        self.record_entropy(norm_TE)
        self.stats.add("zero_outputs", (~active_TE).sum())
        self.stats.add("router_outputs", torch.tensor(float(T * E), device=x_TD.device))
        return y_TD, aux

    @classmethod
    def on_optimizer_step(cls, routers, step, reduce):
        pend = [r._pending for r in routers if r._pending is not None]
        if not pend:
            return
        totals = reduce(torch.stack(pend).sum(0))
        for r in routers:
            r._pending = None
        if totals[1] <= 0:
            return
        sparsity = (totals[0] / totals[1]).item()
        for r in routers:
            o = r.opts
            direction = (r.target_sparsity > sparsity) - (r.target_sparsity < sparsity)  # sign(S* - S)
            r.l1_lambda.mul_(o.alpha ** direction)

    def extra_stats(self):
        return {"l1_lambda": float(self.l1_lambda)}
