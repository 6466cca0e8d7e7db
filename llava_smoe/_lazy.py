"""Package namespaces whose names load on first use, so importing a package costs nothing until
one of its names is used (`llava-smoe --help` and `import llava_smoe` import no torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """`(__getattr__, __all__)` for a package exporting `name -> submodule` (relative to it)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__, sorted(exports)
