"""X-MoE cosine router: cosine similarity in a low-dimensional space, then softmax top-k.

Projecting tokens down before comparing them with learned expert embeddings keeps the routing
scores bounded, which counters representation collapse onto a few experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava_smoe.config import invalid

from . import register_router
from .base import (
    Gate,
    RouterOptions,
    TokenChoiceRouter,
    balance_loss,
    softmax_topk_gate,
    z_loss,
)


@dataclass
class XMoEOptions(RouterOptions):
    z_loss_coef: float = 0.0  # cosine logits are bounded by 1 / temperature
    proj_dim: int = 16
    temperature: float = 0.3

    def validate(self) -> None:
        super().validate()
        if self.proj_dim < 1:
            raise invalid("proj_dim", f"must be a positive integer, got {self.proj_dim!r}")
        if self.temperature <= 0:
            raise invalid("temperature", f"must be > 0, got {self.temperature}")


@register_router("xmoe")
class XMoERouter(TokenChoiceRouter):
    Options = XMoEOptions

    def __init__(self, hidden_size, config, layer_idx=0):
        super().__init__(hidden_size, config, layer_idx)
        self.proj_RD = nn.Parameter(torch.empty(self.opts.proj_dim, hidden_size))
        self.expert_emb_ER = nn.Parameter(torch.empty(config.num_experts, self.opts.proj_dim))
        nn.init.normal_(self.proj_RD, std=0.02)
        nn.init.orthogonal_(self.expert_emb_ER)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TR = F.normalize(x_TD.float() @ self.proj_RD.float().t(), dim=-1)
        emb_ER = F.normalize(self.expert_emb_ER.float(), dim=-1)
        return (h_TR @ emb_ER.t()) / self.opts.temperature

    def gate(self, x_TD):
        logits_TE = self.logits(x_TD)
        probs_TE, idx_TK, weights_TK = softmax_topk_gate(logits_TE, self.top_k)
        aux = {}
        if self.learning and self.opts.balance_coef:
            aux["balance"] = self.opts.balance_coef * balance_loss(probs_TE, idx_TK, self.opts.balance_count)
        if self.learning and self.opts.z_loss_coef:
            aux["z_loss"] = self.opts.z_loss_coef * z_loss(logits_TE)
        return Gate(idx_TK, weights_TK, probs_TE, aux)
