"""Sigmoid gating with auxiliary-loss-free balancing (as in DeepSeek-V3).

Experts are chosen on `sigmoid(logits) + bias`; the bias only steers the choice and never
enters the weights. After each optimizer step the bias of overloaded experts goes down and that
of underloaded experts goes up by a fixed rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_smoe.config import invalid

from . import register_router
from .base import Gate, RouterOptions, TokenChoiceRouter, balance_loss


@dataclass
class SigmoidOptions(RouterOptions):
    balance_coef: float = 0.0  # the bias balances load; a small value adds a balance loss too
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.001
    scale: float = 1.0  # routed scaling factor applied to the renormalised weights

    def validate(self) -> None:
        super().validate()
        if self.bias_update_rate < 0:
            raise invalid("bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")


@register_router("sigmoid")
class SigmoidRouter(TokenChoiceRouter):
    Options = SigmoidOptions

    def __init__(self, hidden_size, config, layer_idx=0):
        super().__init__(hidden_size, config, layer_idx)
        self.weight_ED = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight_ED, std=0.02)
        self.register_buffer("bias_E", torch.zeros(config.num_experts, dtype=torch.float32))
        self._pending_load_E: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.bias_E.dtype != torch.float32:  # tiny updates vanish in bf16
            self.bias_E = self.bias_E.float()
        return self

    def gate(self, x_TD):
        logits_TE = x_TD.float() @ self.weight_ED.float().t()
        scores_TE = torch.sigmoid(logits_TE)
        idx_TK = (scores_TE + self.bias_E).topk(self.top_k, dim=-1).indices
        chosen_TK = scores_TE.gather(1, idx_TK)
        weights_TK = self.opts.scale * chosen_TK / chosen_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        aux = {}
        if self.learning:
            load_E = torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts).to(torch.float64)
            self._pending_load_E = load_E if self._pending_load_E is None else self._pending_load_E + load_E
            if self.opts.balance_coef:
                aux["balance"] = self.opts.balance_coef * balance_loss(probs_TE, idx_TK, self.opts.balance_count)
        return Gate(idx_TK, weights_TK, probs_TE, aux)

    @classmethod
    def on_optimizer_step(cls, routers, step, reduce):
        pending = [r for r in routers if r._pending_load_E is not None]
        if not pending:
            return
        loads_LE = reduce(torch.stack([r._pending_load_E for r in pending]))
        for r, load_E in zip(pending, loads_LE):
            r.bias_E.add_(r.opts.bias_update_rate * torch.sign(load_E.mean() - load_E).to(r.bias_E.dtype))
            r._pending_load_E = None
