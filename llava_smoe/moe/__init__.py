"""The MoE core: batched experts, a router registry, the MoE layer, upcycling and step hooks.

Names load on first use, so `llava_smoe.moe.routers.BUILTIN_ROUTERS` (for argument parsers) and
`llava_smoe.moe.config` import without torch.
"""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "aux_loss_names": "api",
    "collect_aux_losses": "api",
    "configure_moe_schedule": "api",
    "convert_mot_to_token_choice": "api",
    "moe_layers": "api",
    "moe_optimizer_step": "api",
    "routing_stats": "api",
    "take_owner_counts": "api",
    "token_groups": "api",
    "token_owners": "api",
    "MoEConfig": "config",
    "GroupedExperts": "experts",
    "dispatch_pairs": "experts",
    "MoELayer": "layer",
    "available_routers": "routers",
    "get_router_class": "routers",
    "register_router": "routers",
    "upcycle_ffn": "upcycle",
})
