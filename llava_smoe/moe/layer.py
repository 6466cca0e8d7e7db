"""The MoE layer: a drop-in replacement for a transformer FFN."""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .experts import GroupedExperts, grouped_mm_supported
from .routers import get_router_class
from .routers.base import RouteCall


class MoELayer(nn.Module):
    """Router + batched experts (+ optional always-active shared experts).

    `forward(x[..., D]) -> [..., D]` like the FFN it replaces. Aux losses of the last forward
    are kept on the layer (an FFN's signature has no room for them) and taken with
    `llava_smoe.moe.collect_aux_losses`.
    """

    def __init__(
        self,
        config: MoEConfig,
        hidden_size: int,
        ffn_size: int,
        ffn_kind: str = "swiglu",
        activation: str = "silu",
        bias: bool = False,
        layer_idx: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.hidden_size, self.ffn_size, self.layer_idx = hidden_size, ffn_size, layer_idx
        self.experts = GroupedExperts(config.num_experts, hidden_size, ffn_size, ffn_kind, activation, bias)
        self.router = get_router_class(config.router)(hidden_size, config, layer_idx)
        self.shared_experts = (
            GroupedExperts(config.num_shared_experts, hidden_size, ffn_size, ffn_kind, activation, bias)
            if config.num_shared_experts
            else None
        )
        self._aux: dict[str, torch.Tensor] = {}
        self._token_groups_T: torch.Tensor | None = None
        self._token_owners: tuple[torch.Tensor, int] | None = None
        self._auto_impl: tuple[torch.dtype, str] | None = None  # (expert dtype, choice)

    @property
    def impl(self) -> str:
        """"grouped" or "loop"; "auto" decides once per expert dtype (a cast may change it)."""
        if self.config.dispatch != "auto":
            return self.config.dispatch
        dtype = self.experts.w_in.dtype
        if self._auto_impl is None or self._auto_impl[0] != dtype:
            grouped = grouped_mm_supported(dtype, self.hidden_size, self.ffn_size)
            self._auto_impl = (dtype, "grouped" if grouped else "loop")
        return self._auto_impl[1]

    def set_token_groups(self, groups: torch.Tensor | None) -> None:
        """Label the next forward's tokens (0 = text, 1 = image) for split routing statistics."""
        self._token_groups_T = None if groups is None else groups.reshape(-1).long()

    def set_token_owners(self, owners: torch.Tensor | None, num_owners: int = 0) -> None:
        """Label the next forwards' tokens with their owner (0 <= owner < num_owners counted) for
        routing statistics per owner (`tokens_per_owner_expert`)."""
        self._token_owners = None if owners is None else (owners.reshape(-1).long(), num_owners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        D = x.shape[-1]
        if D != self.hidden_size:
            raise ValueError(f"MoELayer expects hidden size {self.hidden_size}, got input of shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, D)
        groups = self._token_groups_T
        if groups is not None and groups.numel() != x_TD.shape[0]:
            groups = None  # labels were for another input (e.g. a cached decoding step)
        owners, num_owners = self._token_owners or (None, 0)
        if owners is not None and owners.numel() != x_TD.shape[0]:
            owners = None
        if owners is not None and groups is None:
            groups = torch.zeros_like(owners)  # no modality labels (a decoding step): text
        call = RouteCall(impl=self.impl, batch_shape=tuple(x.shape[:-1]), token_groups_T=groups,
                         token_owners_T=owners, num_token_owners=num_owners)
        y_TD, aux = self.router(x_TD, self.experts, call)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts.forward_all(x_TD).sum(1)
        # Overwritten, not accumulated: a recomputation under activation checkpointing must not
        # add a stale copy to the next step's losses.
        self._aux = aux
        return y_TD.reshape(x.shape).to(x.dtype)

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        aux, self._aux = self._aux, {}
        return aux

    def routing_stats(self, reset: bool = True) -> dict:
        out = self.router.stats.summary()
        out.update(self.router.extra_stats())
        if reset:
            self.router.stats.reset()
        return out

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router}, num_experts={c.num_experts}, top_k={c.top_k}, shared={c.num_shared_experts}"
