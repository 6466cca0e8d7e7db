"""LLaVA-SMoE: visual instruction tuning with sparse Mixture-of-Experts language models.

    import llava_smoe
    model, processor = llava_smoe.load_pretrained("runs/moe/final")

After `import llava_smoe`, transformers' Auto classes know the `llava_smoe` model type
(`AutoModelForImageTextToText.from_pretrained(path)` works). Registering needs transformers and
torch, which take seconds to import, so it happens when transformers' auto module is imported
(at once, if it already is): `import llava_smoe` itself, and so `llava-smoe --help`, stay fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from ._lazy import lazy_exports

__version__ = "0.1.0"
__getattr__, __all__ = lazy_exports(__name__, {"load_pretrained": "pretrained", "save_pretrained": "pretrained"})

_AUTO_MODULE = "transformers.models.auto"
_REGISTERING_MODULE = "llava_smoe.model.modeling"


_deferred = False


def _register() -> None:
    global _deferred
    # A model module being imported is what imported transformers: registering now would import
    # it again half-built, so it finishes the registration itself (`register_deferred`).
    if any(name.startswith("llava_smoe.model") and getattr(getattr(m, "__spec__", None), "_initializing", False)
           for name, m in list(sys.modules.items())):
        _deferred = True
        return
    importlib.import_module(_REGISTERING_MODULE)


def register_deferred() -> None:
    """Called by `llava_smoe.model.configuration` once its classes exist."""
    global _deferred
    if _deferred:
        _deferred = False
        importlib.import_module(_REGISTERING_MODULE)


class _RegisterAfterAutoImport(importlib.abc.MetaPathFinder):
    """Runs `_register` right after transformers' auto module has been executed."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)  # once, and without finding itself below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if _AUTO_MODULE in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterAutoImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterAutoImport())
