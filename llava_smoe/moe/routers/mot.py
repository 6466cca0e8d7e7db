"""Mixture of Tokens: experts process soft mixtures of tokens across examples.

A group is G tokens at the same position in G different sequences of the batch, so causal
language modelling stays valid (no token sees another position). For each expert, the group's
tokens are mixed with softmax weights over the group, the expert runs once on the mixture, and
each token receives its share back. Dense batched matmuls: no sorting, nothing dropped.

Serving must not mix different users' requests: `to_token_choice_router` (through
`llava_smoe.moe.convert_mot_to_token_choice`, or a `vlm` stage's `mot_to_token_choice`) converts a trained layer to
token-choice sparse routing initialised from the controller ("transition tuning").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava_smoe.config import invalid

from . import register_router
from .base import RouteCall, Router, RouterOptions


@dataclass
class MoTOptions(RouterOptions):
    balance_coef: float = 0.0  # every expert sees every group: nothing to balance
    z_loss_coef: float = 0.0
    group_size: int = 4
    temperature: float = 1.0
    learnable_temperature: bool = False

    def validate(self) -> None:
        super().validate()
        if self.group_size < 1:
            raise invalid("group_size", f"must be a positive integer, got {self.group_size!r}")
        if self.temperature <= 0:
            raise invalid("temperature", f"must be > 0, got {self.temperature}")

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.group_size:
            raise ValueError(
                f"Mixture of Tokens mixes groups of {self.group_size} sequences, but the batch has "
                f"{batch_size} sequences: use a batch size divisible by router_options.group_size, "
                "or convert the model to token-choice routing for inference (convert_mot_to_token_choice)"
            )


@register_router("mot")
class MoTRouter(Router):
    Options = MoTOptions

    def __init__(self, hidden_size, config, layer_idx=0):
        super().__init__(hidden_size, config, layer_idx)
        self.weight_ED = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight_ED, std=0.02)
        log_tau = torch.tensor(math.log(self.opts.temperature))
        if self.opts.learnable_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    def forward(self, x_TD, experts, call: RouteCall):
        if len(call.batch_shape) != 2:
            raise ValueError(
                f"Mixture of Tokens needs [batch, seq, hidden] input to form groups across sequences; "
                f"got leading shape {tuple(call.batch_shape)}"
            )
        B, S = call.batch_shape
        self.opts.check_batch_size(B)
        G, E, D = self.opts.group_size, self.num_experts, x_TD.shape[-1]
        N = B // G  # groups per position
        x_NGSD = x_TD.view(N, G, S, D)
        logits_NGSE = (x_NGSD.float() @ self.weight_ED.float().t()) / self.log_temperature.exp()
        mix_NGSE = F.softmax(logits_NGSE, dim=1)  # over the group, per expert and position
        # z[n, s, e] = sum_g mix[n, g, s, e] * x[n, g, s]
        z_ENSD = torch.einsum("ngse,ngsd->ensd", mix_NGSE.to(x_TD.dtype), x_NGSD)
        y_ENSD = experts.forward_batched(z_ENSD.reshape(E, N * S, D)).view(E, N, S, D)
        out_NGSD = torch.einsum("ngse,ensd->ngsd", mix_NGSE.to(y_ENSD.dtype), y_ENSD)

        T = x_TD.shape[0]
        expert_P = torch.arange(E, device=x_TD.device).repeat(T)
        token_P = torch.arange(T, device=x_TD.device).repeat_interleave(E)
        self.record_assignment(expert_P, token_P, call)
        self.record_evaluations(float(E * N * S), T, x_TD.device)  # each expert runs once per group
        return out_NGSD.reshape(T, D), {}

    @torch.no_grad()
    def to_token_choice_router(self, config) -> Router:
        """A token-choice router (from `config`) whose logits start as the controller's."""
        from . import get_router_class

        router = get_router_class(config.router)(self.hidden_size, config, self.layer_idx)
        if not hasattr(router, "weight_ED"):
            raise ValueError(f"cannot initialise router {config.router!r} from a MoT controller (no weight_ED)")
        router.weight_ED.copy_(self.weight_ED / self.log_temperature.exp())
        return router.to(self.weight_ED.device)
