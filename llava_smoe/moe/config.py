"""Configuration of one MoE layer: which router, how many experts, how they run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DISPATCH_CHOICES = ("auto", "grouped", "loop")
FFN_KINDS = ("swiglu", "gelu")


@dataclass
class MoEConfig:
    """One MoE layer.

    `router_options` holds the chosen router's own options (validated by the router class, so
    a misspelt option fails at construction with the list of valid ones).
    """

    num_experts: int = 4
    top_k: int = 2
    router: str = "competesmoe"
    router_options: dict[str, Any] = field(default_factory=dict)
    num_shared_experts: int = 0
    # Std of the relative Gaussian noise added to each upcycled expert (0 keeps exact copies).
    upcycle_noise: float = 0.0
    # "auto": grouped GEMM where torch provides it, else the per-expert loop.
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        from .routers import get_router_class  # routers import this module

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"MoEConfig.num_experts must be a positive integer, got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"MoEConfig.top_k must be a positive integer, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "a token cannot be routed to more experts than exist"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.upcycle_noise < 0:
            raise ValueError(f"MoEConfig.upcycle_noise must be >= 0, got {self.upcycle_noise}")
        if self.dispatch not in DISPATCH_CHOICES:
            raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCH_CHOICES}, got {self.dispatch!r}")
        router_cls = get_router_class(self.router)  # raises on an unknown name
        self.router_options = dict(self.router_options or {})
        router_cls.Options(**self.router_options).validate(self)

    @property
    def options(self):
        """The router's options as its validated dataclass (defaults filled in)."""
        from .routers import get_router_class

        return get_router_class(self.router).Options(**self.router_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**d)
