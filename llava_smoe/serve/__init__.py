"""Serving: one generation engine (`Engine`) behind a terminal chat, a Gradio page and an
OpenAI-compatible HTTP API. Importing this package does not import torch; the engine does."""

from llava_smoe.serve.config import EngineConfig, ServerLimits

__all__ = ["EngineConfig", "ServerLimits"]
