"""The multimodal model: vision towers, projectors, MoE surgery, the language model and the VLM.

Names load on first use, so `llava_smoe.model.vision` can be imported without transformers'
model code. `llava_smoe.model.modeling` registers `llava_smoe` with transformers' AutoConfig,
AutoModelForImageTextToText and AutoModelForCausalLM, so saved checkpoints load through the
Auto classes without remote code (`import llava_smoe` has it imported when transformers' auto
module is).
"""

from __future__ import annotations

from llava_smoe._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "LlavaSmoeConfig": "configuration",
    "LanguageModelSpec": "configuration",
    "MoEPlacement": "configuration",
    "VLMConfig": "configuration",
    "LMModelConfig": "language_model",
    "build_language_model": "language_model",
    "describe": "language_model",
    "load_language_model": "language_model",
    "parameter_counts": "language_model",
    "save_language_model": "language_model",
    "LlavaSmoeForConditionalGeneration": "modeling",
    "LlavaSmoePreTrainedModel": "modeling",
    "build_model": "modeling",
    "resolve_attn_implementation": "modeling",
    "MLPProjector": "projector",
    "MoEProjector": "projector",
    "PositionedProjector": "projector",
    "ProjectorConfig": "projector",
    "build_projector": "projector",
    "upcycle_projector": "projector",
    "decoder_layers": "surgery",
    "lm_moe": "surgery",
    "record_moe": "surgery",
    "upcycle": "surgery",
    "HFVisionTower": "vision",
    "OpenClipVisionTower": "vision",
    "VisionTower": "vision",
    "VisionTowerConfig": "vision",
    "build_vision_tower": "vision",
})
