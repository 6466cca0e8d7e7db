"""lmms-eval finds `--model llava_smoe` through the `lmms_eval.models` entry point (pyproject.toml).

Kept apart from `lmms_model` so that listing models imports neither torch nor the model.
"""

from __future__ import annotations

MODEL_ID = "llava_smoe"


def model_manifests() -> list:
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="llava_smoe.evaluation.lmms_model.LlavaSmoeLmms")]
