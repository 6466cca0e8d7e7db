"""Tiny models and the toy task: fixtures for tests and smoke runs (`task: toy` recipes, demo
checkpoints); nothing here is needed to train or serve real models."""

from llava_smoe.testing.tiny import (
    CORPUS,
    TEXT_FAMILIES,
    VISION_KINDS,
    save_tiny_checkpoint,
    tiny_model_config,
    tiny_processor,
    tiny_text_config,
    tiny_vision_config,
)

__all__ = [
    "CORPUS",
    "TEXT_FAMILIES",
    "VISION_KINDS",
    "save_tiny_checkpoint",
    "tiny_model_config",
    "tiny_processor",
    "tiny_text_config",
    "tiny_vision_config",
]
