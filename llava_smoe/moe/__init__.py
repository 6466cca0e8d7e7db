"""The MoE core: batched experts, a router registry, the MoE layer, upcycling and step hooks."""

from .api import (
    aux_loss_names,
    convert_mot_to_token_choice,
    collect_aux_losses,
    configure_moe_schedule,
    moe_layers,
    moe_optimizer_step,
    routing_stats,
    token_groups,
)
from .config import MoEConfig
from .experts import GroupedExperts, dispatch_pairs
from .layer import MoELayer
from .routers import available_routers, get_router_class, register_router
from .upcycle import upcycle_ffn

__all__ = [
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "available_routers",
    "aux_loss_names",
    "collect_aux_losses",
    "configure_moe_schedule",
    "convert_mot_to_token_choice",
    "dispatch_pairs",
    "get_router_class",
    "moe_layers",
    "moe_optimizer_step",
    "register_router",
    "routing_stats",
    "token_groups",
    "upcycle_ffn",
]
