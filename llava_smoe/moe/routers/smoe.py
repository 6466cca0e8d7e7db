"""SMoE: softmax top-k routing with the Switch balance loss and the router z-loss."""

from __future__ import annotations

import torch
from torch import nn

from . import register_router
from .base import Gate, TokenChoiceRouter, balance_loss, softmax_topk_gate, z_loss


@register_router("smoe")
class SMoERouter(TokenChoiceRouter):
    def __init__(self, hidden_size, config, layer_idx=0):
        super().__init__(hidden_size, config, layer_idx)
        self.weight_ED = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight_ED, std=0.02)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Routing decisions are made in fp32: bf16 logits flip near-ties between experts.
        return x_TD.float() @ self.weight_ED.float().t()

    def gate(self, x_TD: torch.Tensor) -> Gate:
        logits_TE = self.logits(x_TD)
        probs_TE, idx_TK, weights_TK = softmax_topk_gate(logits_TE, self.top_k)
        aux = {}
        if self.learning:
            if self.opts.balance_coef:
                aux["balance"] = self.opts.balance_coef * balance_loss(probs_TE, idx_TK, self.opts.balance_count)
            if self.opts.z_loss_coef:
                aux["z_loss"] = self.opts.z_loss_coef * z_loss(logits_TE)
        return Gate(idx_TK, weights_TK, probs_TE, aux)
