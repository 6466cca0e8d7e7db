"""Router registry: one module per router, each registering its class under a name.

Adding a router is adding one file here that defines a `Router` subclass decorated with
`@register_router("name")` (and listing the module in `_BUILTIN`).
"""

from __future__ import annotations

import importlib
import threading

_REGISTRY: dict[str, type] = {}
# The routers that ship with the package (their modules are imported on first use).
BUILTIN_ROUTERS = ("smoe", "competesmoe", "remoe", "mot", "xmoe", "sigmoid")
_loaded = False
# Threads validating configs at once (a study's workers) must not see a half-filled registry.
_load_lock = threading.RLock()


def register_router(name: str):
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if not _loaded:
            for mod in BUILTIN_ROUTERS:
                importlib.import_module(f"{__name__}.{mod}")
            _loaded = True


def get_router_class(name: str) -> type:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; registered routers: {sorted(_REGISTRY)}") from None


def available_routers() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)
