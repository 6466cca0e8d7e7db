"""The multimodal model: vision towers, projectors, language-model MoE surgery and the VLM.

Importing this package registers `llava_smoe` with transformers' AutoConfig,
AutoModelForImageTextToText and AutoModelForCausalLM, so saved checkpoints load through the
Auto classes without remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from .configuration import LlavaSmoeConfig, MoEPlacement, VLMConfig
from .language_model import (
    build_language_model,
    decoder_layers,
    load_language_model,
    resolve_layers,
    upcycle_blocks,
)
from .modeling import (
    LlavaSmoeForConditionalGeneration,
    LlavaSmoePreTrainedModel,
    build_model,
    load_model,
    resolve_attn_implementation,
)
from .projector import (
    MLPProjector,
    MoEProjector,
    PositionedProjector,
    ProjectorConfig,
    build_projector,
    upcycle_projector,
)
from .tiny import tiny_model_config, tiny_text_config, tiny_vision_config
from .vision import HFVisionTower, OpenClipVisionTower, VisionTower, VisionTowerConfig, build_vision_tower

AutoConfig.register(LlavaSmoeConfig.model_type, LlavaSmoeConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaSmoeConfig, LlavaSmoeForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LlavaSmoeConfig, LlavaSmoeForConditionalGeneration, exist_ok=True)

__all__ = [
    "HFVisionTower",
    "LlavaSmoeConfig",
    "LlavaSmoeForConditionalGeneration",
    "LlavaSmoePreTrainedModel",
    "MLPProjector",
    "MoEPlacement",
    "MoEProjector",
    "OpenClipVisionTower",
    "PositionedProjector",
    "ProjectorConfig",
    "VLMConfig",
    "VisionTower",
    "VisionTowerConfig",
    "build_language_model",
    "build_model",
    "build_projector",
    "build_vision_tower",
    "decoder_layers",
    "load_language_model",
    "load_model",
    "resolve_attn_implementation",
    "resolve_layers",
    "tiny_model_config",
    "tiny_text_config",
    "tiny_vision_config",
    "upcycle_blocks",
    "upcycle_projector",
]
