"""LlavaSmoeConfig: everything needed to rebuild, feed and serve a checkpoint.

The checkpoint describes itself: the vision tower's architecture (an open_clip model dict or
an HF vision config, no external file), the projector, the language model (a nested
transformers config), the MoE config and where MoE layers sit, the image token, the number
of tokens per image, the chat template and the image preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .language_model import LayerSpec
from .projector import ProjectorConfig
from .vision import VisionTowerConfig

IMAGE_PAD_MODES = ("pad", "resize", "crop")


@dataclass
class MoEPlacement:
    """Where MoE layers go.

    language_model / vision_tower: "all", "every_other" (odd layers 1, 3, 5, ... as MoE-LLaVA),
    "none", or a list of layer indices. In the vision tower "all" / "every_other" count only the
    blocks up to the feature layer (later ones never reach the features); listing a later block
    is an error. The projector is MoE when its type is "moe".
    """

    language_model: LayerSpec = "every_other"
    vision_tower: LayerSpec = "none"

    def __post_init__(self) -> None:
        for name in ("language_model", "vision_tower"):
            spec = getattr(self, name)
            if isinstance(spec, str):
                if spec not in ("all", "every_other", "none"):
                    raise ValueError(
                        f"moe_placement.{name}={spec!r}: use 'all', 'every_other', 'none' or a list of layer indices"
                    )
            else:
                try:
                    setattr(self, name, [int(i) for i in spec])
                except (TypeError, ValueError):
                    raise ValueError(f"moe_placement.{name} must be a string or a list of ints, got {spec!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEPlacement:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"moe_placement: unknown keys {sorted(unknown)}; valid: ['language_model', 'vision_tower']"
            )
        return cls(**d)


class LlavaSmoeConfig(PreTrainedConfig):
    """Composite config; the component configs are plain dicts of their dataclasses.

    vision_config: `VisionTowerConfig.to_dict()` (resolved: rebuildable without files).
    projector_config: `ProjectorConfig.to_dict()`.
    text_config: the language model's transformers config (nested, with `model_type`).
    moe_config: `MoEConfig.to_dict()`, or None for a dense model. When set, the MoE layers named
        by `moe_placement` exist in the model (they are built from this config on load).
    image_token / image_token_id: the placeholder that marks where an image's features go.
    num_image_tokens: placeholders per image (the vision tower's token count).
    chat_template_name / chat_template: the conversation format used in training.
    image_size / image_mean / image_std / image_pad_mode: the preprocessing the tower expects;
        image_pad_mode "pad" pads to a square with the mean colour before resizing (LLaVA),
        "resize" squashes, "crop" resizes the short side and centre-crops.
    """

    model_type = "llava_smoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    vision_config: dict | None = None
    projector_config: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    moe_config: dict | None = None
    moe_placement: dict | None = None
    image_token: str = "<image>"
    image_token_id: int | None = None
    num_image_tokens: int | None = None
    chat_template_name: str | None = None
    chat_template: str | None = None
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    image_pad_mode: str = "pad"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The language model owns its embedding tying; mirror it so transformers' tying logic agrees.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.image_pad_mode not in IMAGE_PAD_MODES:
            raise ValueError(f"image_pad_mode must be one of {IMAGE_PAD_MODES}, got {self.image_pad_mode!r}")
        if self.projector_config is None:
            self.projector_config = {"type": "mlp2x_gelu", "bias": True}
        if self.moe_placement is None:
            self.moe_placement = MoEPlacement().to_dict()
        self.placement()  # validates
        if self.image_token_id is not None and self.text_config is not None:
            vocab = self.text_config.vocab_size
            if not 0 <= self.image_token_id < vocab:
                raise ValueError(
                    f"image_token_id={self.image_token_id} is outside the language model's vocabulary "
                    f"(vocab_size={vocab}): add {self.image_token!r} to the tokenizer and set "
                    "text_config.vocab_size to len(tokenizer)"
                )

    def placement(self) -> MoEPlacement:
        return MoEPlacement.from_dict(self.moe_placement)

    def moe(self):
        """The MoEConfig object, or None for a dense model."""
        if self.moe_config is None:
            return None
        from llava_smoe.moe import MoEConfig

        return MoEConfig.from_dict(self.moe_config)


@dataclass
class VLMConfig:
    """How to assemble a model, as the training recipes write it (a plain dict -> `from_dict`).

    vision: VisionTowerConfig fields. projector: ProjectorConfig fields.
    language_model: {"name_or_path": local folder or hub id} or {"config": {"model_type": ..., ...}}.
    moe: MoEConfig fields, or None for a dense model; moe_placement: MoEPlacement fields.
    upcycle_projector: turn the (mlp3x_gelu) projector's last two Linears into experts as well.
    vocab_size: resize the LM's embeddings to the tokenizer's length (after adding image_token).
    dtype: "float32" | "bfloat16" | "float16" | None (the checkpoints' own).
    """

    vision: VisionTowerConfig
    language_model: dict[str, Any]
    image_token_id: int
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    moe: Any = None
    moe_placement: MoEPlacement = field(default_factory=MoEPlacement)
    upcycle_projector: bool = False
    image_token: str = "<image>"
    vocab_size: int | None = None
    chat_template_name: str | None = None
    chat_template: str | None = None
    image_pad_mode: str = "pad"
    attn_implementation: str = "sdpa"
    dtype: str | None = None

    def __post_init__(self) -> None:
        lm = self.language_model
        if not isinstance(lm, dict) or set(lm) not in ({"name_or_path"}, {"config"}):
            raise ValueError(
                "language_model must be {'name_or_path': PATH} or {'config': {'model_type': ..., ...}}, "
                f"got {lm!r}"
            )
        if self.image_pad_mode not in IMAGE_PAD_MODES:
            raise ValueError(f"image_pad_mode must be one of {IMAGE_PAD_MODES}, got {self.image_pad_mode!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be 'float32', 'bfloat16', 'float16' or null, got {self.dtype!r}")
        if self.upcycle_projector and self.moe is None:
            raise ValueError("upcycle_projector needs `moe` (the MoE config)")
        if self.projector.type == "moe" and self.moe is None:
            raise ValueError("projector.type 'moe' needs `moe` (the MoE config)")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype) if self.dtype else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        from llava_smoe.moe import MoEConfig

        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        for required in ("vision", "language_model", "image_token_id"):
            if required not in d:
                raise ValueError(f"model config: missing required key {required!r}")
        d = dict(d)
        d["vision"] = VisionTowerConfig.from_dict(d["vision"])
        d["projector"] = ProjectorConfig.from_dict(d.get("projector") or {})
        d["moe_placement"] = MoEPlacement.from_dict(d.get("moe_placement") or {})
        if d.get("moe") is not None:
            d["moe"] = MoEConfig.from_dict(d["moe"])
        return cls(**d)

    def build(self):
        from .modeling import build_model

        return build_model(self)
