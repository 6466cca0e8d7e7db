"""Language-model pretraining with MoE FFNs: model, packed-text data, the `lm` task, run comparison.

`llava_smoe.lm.task` registers the `lm` training task (the trainer imports it on demand).
Names are imported lazily so that `llava-smoe compare` starts without torch or transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LMModelConfig": "model",
    "build_lm": "model",
    "install_moe_layers": "model",
    "lm_moe_spec": "model",
    "load_lm": "model",
    "parameter_counts": "model",
    "save_lm": "model",
    "PackedSequences": "data",
    "ReadOptions": "data",
    "TokenCache": "data",
    "build_token_cache": "data",
    "iter_documents": "data",
    "resolve_files": "data",
    "compare_runs": "compare",
    "load_run": "compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
