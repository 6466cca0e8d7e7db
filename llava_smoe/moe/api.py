"""Model-level MoE operations: what a trainer or an analysis tool calls.

The trainer calls `configure_moe_schedule` once before training and `moe_optimizer_step`
after every optimizer step; per-step state (competition schedule position, ReMoE lambda,
sigmoid bias) changes there and nowhere else, never inside forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from .layer import MoELayer


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """Every MoE layer of `model`, in module order, with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def _layers(model: nn.Module | Iterable[MoELayer]) -> Iterable[MoELayer]:
    # A hot loop passes the layers it found once instead of walking the module tree each call.
    return [m for _, m in moe_layers(model)] if isinstance(model, nn.Module) else model


def _routers_by_class(model: nn.Module) -> dict[type, list]:
    groups: dict[type, list] = defaultdict(list)
    for _, layer in moe_layers(model):
        groups[type(layer.router)].append(layer.router)
    return groups


def collect_aux_losses(model: nn.Module | Iterable[MoELayer]) -> dict[str, torch.Tensor]:
    """Aux losses of the last forward, coefficient-weighted and summed over layers by name.
    `model` may be the model or its MoE layers (found once with `moe_layers`)."""
    total: dict[str, torch.Tensor] = {}
    for layer in _layers(model):
        for name, value in layer.pop_aux_losses().items():
            total[name] = total[name] + value if name in total else value
    return total


def aux_loss_names(model: nn.Module) -> list[str]:
    """Every aux loss name the model's MoE layers can produce; a given step may produce fewer
    (e.g. CompeteSMoE's distillation exists only on competition steps)."""
    names: set[str] = set()
    for _, layer in moe_layers(model):
        names |= layer.router.aux_loss_names()
    return sorted(names)


def configure_moe_schedule(model: nn.Module, total_steps: int) -> None:
    """Tell routers the run's length (CompeteSMoE warm-up) and their order in the model."""
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    for cls, routers in _routers_by_class(model).items():
        cls.configure(routers, total_steps)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def moe_optimizer_step(model: nn.Module, step: int) -> None:
    """Advance per-step MoE state; `step` = optimizer steps completed so far.

    Every data-parallel rank must call it (ReMoE and sigmoid routers all-reduce their
    measurements here, once per step).
    """
    for cls, routers in _routers_by_class(model).items():
        cls.on_optimizer_step(routers, int(step), _all_reduce_sum)


def routing_stats(model: nn.Module, reset: bool = True) -> dict[str, dict]:
    """Per-layer routing statistics accumulated since the last reset, plus an 'all' summary."""
    out: dict[str, dict] = {}
    for name, layer in moe_layers(model):
        out[name] = layer.routing_stats(reset=reset)
    if out:
        summary: dict[str, float] = {}
        for key in ("load_cv", "max_over_mean_load", "router_entropy_normalized", "competition_rate",
                    "router_agreement", "sparsity", "l1_lambda", "expert_evals_per_token"):
            vals = [s[key] for s in out.values() if key in s]
            if vals:
                summary[key] = sum(vals) / len(vals)
        summary["dead_experts"] = sum(s.get("dead_experts", 0) for s in out.values())
        out["all"] = summary
    return out


@contextmanager
def token_groups(model: nn.Module | Iterable[MoELayer], groups: torch.Tensor | None):
    """Label tokens (0 = text, 1 = image) for the forwards inside the block, for split statistics."""
    layers = list(_layers(model))
    for layer in layers:
        layer.set_token_groups(groups)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_token_groups(None)


@contextmanager
def token_owners(model: nn.Module | Iterable[MoELayer], owners: torch.Tensor | None, num_owners: int):
    """Label tokens with their owner (e.g. the request of each row of a serving batch) for the
    forwards inside the block; `take_owner_counts` then returns the routing of each owner.
    Owners >= num_owners (padding) are not counted."""
    layers = list(_layers(model))
    for layer in layers:
        layer.set_token_owners(owners, num_owners)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_token_owners(None)


def take_owner_counts(model: nn.Module | Iterable[MoELayer]) -> list[torch.Tensor | None]:
    """Per MoE layer, the tokens each owner sent to each expert since the last call
    ([num_owners, 2 (text, image), E], on the layer's device; None where nothing was counted)."""
    return [layer.router.stats.pop("tokens_per_owner_expert") for layer in _layers(model)]


def convert_mot_to_token_choice(model: nn.Module, router: str = "smoe", top_k: int | None = None) -> int:
    """Turn every Mixture-of-Tokens layer into token-choice sparse routing, in place.

    The new router's logits start as the trained controller's, the experts are kept; a short
    fine-tune ("transition tuning") then adapts the model to per-token routing so requests are
    never mixed at inference. Returns the number of converted layers.
    """
    from dataclasses import replace

    from .routers.mot import MoTRouter

    converted = 0
    for _, layer in moe_layers(model):
        if isinstance(layer.router, MoTRouter):
            config = replace(layer.config, router=router, router_options={}, top_k=top_k or layer.config.top_k)
            layer.router = layer.router.to_token_choice_router(config)
            layer.config = config
            converted += 1
    return converted
