"""The inference engine every front end uses: token-id requests, continuous batching, sampling,
streaming. Importing this package does not import torch; its names load on first use."""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "EngineConfig": "config",
    "Completion": "engine",
    "EncodedPrompt": "engine",
    "Engine": "engine",
    "RequestHandle": "engine",
    "Turn": "engine",
    "encode_turns": "engine",
    "ContextLengthError": "sampling",
    "RequestError": "sampling",
    "SamplingParams": "sampling",
    "TextStreamer": "streaming",
})
