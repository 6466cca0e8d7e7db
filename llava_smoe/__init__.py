"""LLaVA-SMoE: visual instruction tuning with sparse Mixture-of-Experts language models.

    import llava_smoe
    model, processor = llava_smoe.load_pretrained("runs/moe/final")

After `import llava_smoe`, transformers' Auto classes know the `llava_smoe` model type
(`AutoModelForImageTextToText.from_pretrained(path)` works). Our names join transformers' auto
tables when those modules load (at once, if they already have), and our model code is imported
only when a class is asked for: `import llava_smoe` itself, and so `llava-smoe --help`, stay fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

from ._lazy import lazy_exports

__version__ = "0.1.0"
__getattr__, __all__ = lazy_exports(__name__, {"load_pretrained": "pretrained", "save_pretrained": "pretrained"})

# transformers' auto modules look model types up by name and import `transformers.models.<type>`:
# once each of them has run, it gets our names, and that module is an alias that imports our model
# code when a class is asked for. Nothing heavy is imported before a checkpoint is loaded, and
# nothing is imported while transformers itself is half imported.
_TABLES = {
    "transformers.models.auto.configuration_auto": {"CONFIG_MAPPING_NAMES": "LlavaSmoeConfig"},
    "transformers.models.auto.modeling_auto": {"MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "LlavaSmoeForConditionalGeneration",
                                               "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "LlavaSmoeForConditionalGeneration"},
}
_MODEL_TYPE = "llava_smoe"
_ALIAS = f"transformers.models.{_MODEL_TYPE}"


def _alias_module():
    import types

    module = types.ModuleType(_ALIAS, "llava_smoe's model classes, for transformers' Auto classes")
    classes = {name for names in _TABLES.values() for name in names.values()}

    def __getattr__(name: str):
        # Only the class names: tools that probe modules (inspect, torch.compile) ask for
        # dunders, and answering those would import our model while transformers is half imported.
        if name not in classes:
            raise AttributeError(f"module {_ALIAS!r} has no attribute {name!r}")
        return getattr(importlib.import_module("llava_smoe.model.modeling"), name)

    module.__getattr__ = __getattr__
    return module


def _add_names(module) -> None:
    for table, class_name in _TABLES[module.__name__].items():
        getattr(module, table).setdefault(_MODEL_TYPE, class_name)
    sys.modules.setdefault(_ALIAS, _alias_module())


class _NameAutoModules(importlib.abc.MetaPathFinder):
    """Adds our names to each of transformers' auto modules right after it has run."""

    def find_spec(self, name, path, target=None):
        if name not in _TABLES:
            return None
        sys.meta_path.remove(self)  # while finding the real spec, not itself
        try:
            spec = importlib.util.find_spec(name)
        finally:
            if any(n not in sys.modules for n in _TABLES if n != name):
                sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_name(module):
            exec_module(module)
            _add_names(module)

        spec.loader.exec_module = exec_then_name
        return spec


if "transformers.models.auto.modeling_auto" in sys.modules:  # its mappings are built: register for real
    importlib.import_module("llava_smoe.model.modeling")
else:
    if "transformers.models.auto.configuration_auto" in sys.modules:
        _add_names(sys.modules["transformers.models.auto.configuration_auto"])
    if not any(isinstance(f, _NameAutoModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _NameAutoModules())
