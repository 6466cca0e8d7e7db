"""Configuration of one MoE layer: which router, how many experts, how they run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llava_smoe.config import Config, ConfigError, dump, invalid, parse

Dispatch = Literal["auto", "grouped", "loop"]
FFN_KINDS = ("swiglu", "gelu")


@dataclass
class MoEConfig(Config):
    """One MoE layer.

    `router_options` holds the chosen router's own options, checked against the router's
    `Options` config (a misspelt option fails with the list of valid ones) and stored with
    every default filled in, so a checkpoint records exactly what it trained with.
    """

    num_experts: int = 4
    top_k: int = 2
    router: str = "competesmoe"
    router_options: dict[str, Any] = field(default_factory=dict)
    num_shared_experts: int = 0
    # Std of the relative Gaussian noise added to each upcycled expert (0 keeps exact copies).
    upcycle_noise: float = 0.0
    # "auto": grouped GEMM where torch provides it, else the per-expert loop.
    dispatch: Dispatch = "auto"

    def validate(self) -> None:
        from .routers import (  # routers import this module
            available_routers,
            get_router_class,
        )

        if self.num_experts < 1:
            raise invalid("num_experts", f"must be a positive integer, got {self.num_experts}")
        if self.top_k < 1:
            raise invalid("top_k", f"must be a positive integer, got {self.top_k}")
        if self.top_k > self.num_experts:
            raise invalid("top_k", f"top_k={self.top_k} exceeds num_experts={self.num_experts}: a token cannot "
                                   "be routed to more experts than exist")
        if self.num_shared_experts < 0:
            raise invalid("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        if self.upcycle_noise < 0:
            raise invalid("upcycle_noise", f"must be >= 0, got {self.upcycle_noise}")
        if self.router not in available_routers():
            raise invalid("router", f"{self.router!r} is not one of {available_routers()}")
        options = parse(get_router_class(self.router).Options, self.router_options, ("router_options",))
        try:
            options.check(self)
        except ConfigError as exc:
            raise exc.within("router_options") from None
        self.router_options = dump(options)

    @property
    def options(self):
        """The router's options as its config class (every default filled in)."""
        from .routers import get_router_class

        return parse(get_router_class(self.router).Options, self.router_options)


# Where MoE layers go in a stack of blocks: every block, the odd blocks 1, 3, 5, ... (as MoE-LLaVA
# places them), none, or explicit block indices.
LayerSpec = Literal["all", "every_other", "none"] | list[int]


def resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """A LayerSpec as sorted block indices; raises ConfigError for an index out of range."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "every_other":
        return list(range(1, num_layers, 2))
    if spec == "none":
        return []
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layer indices {bad} are out of range for {num_layers} layers (0..{num_layers - 1})")
    return layers


@dataclass
class MoELayers(Config):
    """The record of a component's MoE layers: their config and which blocks they replace.

    The one place a checkpoint states its MoE placement: a language model keeps it in its config
    under `llava_smoe_moe`, a vision tower under `moe`, the "moe" projector as its `moe_config`.
    """

    moe_config: MoEConfig
    layers: LayerSpec
