"""Conversion between llava-smoe checkpoints and the standard transformers LLaVA format
(`llava-smoe export`, `llava-smoe import`). Names load on first use."""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "ConversionError": "hf_llava",
    "export_hf_llava": "hf_llava",
    "import_hf_llava": "hf_llava",
    "open_clip_to_hf_clip": "hf_llava",
    "jinja_chat_template": "chat_template",
})
