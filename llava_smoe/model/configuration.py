"""Model configs: `LlavaSmoeConfig` (what a checkpoint is) and `VLMConfig` (how a recipe assembles one).

`LlavaSmoeConfig` holds the architecture and nothing else: the vision tower (an open_clip model
dict or an HF vision config, no external file), the projector, the language model (a nested
transformers config) and the image token's id. Each component records its own MoE layers
(`MoELayers`, written by `surgery`). The chat template, the image token's text, the number of
tokens per image and the image preprocessing belong to the processor saved beside it
(`processor_config.json`); `llava_smoe.load_pretrained` loads both and checks they agree.

Checkpoints of format 1 (which also stored template, preprocessing and a model-level MoE
placement) are converted on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from llava_smoe.config import Config, dump, invalid, parse
from llava_smoe.moe.config import LayerSpec, MoEConfig, resolve_layers

from .projector import ProjectorConfig
from .vision import VisionTowerConfig

FORMAT_VERSION = 2
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "auto"]
DTypeName = Literal["float32", "bfloat16", "float16"]
# Keys of format 1 that now live in the processor (or were never read back).
_V1_PROCESSOR_KEYS = ("image_token", "num_image_tokens", "chat_template_name", "chat_template", "image_size",
                      "image_mean", "image_std", "image_pad_mode")


@dataclass
class MoEPlacement(Config):
    """Where a recipe puts MoE layers.

    language_model / vision_tower: "all", "every_other" (odd layers 1, 3, 5, ... as MoE-LLaVA),
    "none", or a list of layer indices. In the vision tower "all" / "every_other" count only the
    blocks up to the feature layer (later ones never reach the features); listing a later block
    is an error. The projector is MoE when its type is "moe" (or with `upcycle_projector`).
    """

    language_model: LayerSpec = "every_other"
    vision_tower: LayerSpec = "none"


@dataclass
class LanguageModelSpec(Config):
    """Exactly one of: name_or_path (a local folder or hub id, dense or an MoE LM trained by the
    `lm` task), architecture (a published architecture of `llava_smoe.model.architectures`, e.g.
    qwen2.5-0.5b-instruct; random weights) or config (a transformers config dict with
    `model_type`; random weights). With `architecture`, `config` holds only the keys that replace
    the architecture's (e.g. num_hidden_layers: 4)."""

    name_or_path: str | None = None
    architecture: str | None = None
    config: dict[str, Any] | None = None

    def validate(self) -> None:
        given = [n for n in ("name_or_path", "architecture") if getattr(self, n) is not None]
        if self.config is not None and self.architecture is None:
            given.append("config")
        if len(given) != 1:
            raise invalid(given[-1] if given else "name_or_path",
                          "give exactly one of name_or_path (a folder or hub id), architecture (a published "
                          "architecture) or config (a transformers config dict with 'model_type'); "
                          f"got {given or 'none'}")
        if self.architecture is not None:
            from .architectures import get_architecture

            try:
                get_architecture(self.architecture, "language_model")
            except ValueError as exc:
                raise invalid("architecture", str(exc)) from None
        elif self.config is not None and "model_type" not in self.config:
            raise invalid("config", "needs 'model_type' (e.g. 'qwen2', 'llama', 'phi3')")

    def resolved_config(self) -> dict[str, Any] | None:
        """The config dict this builds from with random weights (None for name_or_path)."""
        if self.architecture is not None:
            from .architectures import get_architecture

            return get_architecture(self.architecture, "language_model").resolved(self.config)
        return self.config


@dataclass
class VLMConfig(Config):
    """How to assemble a model, as a training recipe's `vlm.model` section writes it.

    vision / projector / language_model: the parts. image_token_id: the placeholder's id (the
    vlm task fills it from its processor). moe / moe_placement: upcycle the assembled model's
    FFNs into MoE layers; upcycle_projector also turns an mlp3x_gelu projector into experts.
    vocab_size: resize the LM's embeddings to the tokenizer's length (after adding the image
    token). dtype: null keeps the checkpoints' own.
    """

    vision: VisionTowerConfig
    language_model: LanguageModelSpec
    image_token_id: int | None = None
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    moe: MoEConfig | None = None
    moe_placement: MoEPlacement = field(default_factory=MoEPlacement)
    upcycle_projector: bool = False
    vocab_size: int | None = None
    attn_implementation: AttnImplementation = "sdpa"
    dtype: DTypeName | None = None

    def validate(self) -> None:
        if self.upcycle_projector and self.moe is None:
            raise invalid("upcycle_projector", "needs `moe` (the MoE config)")
        if self.projector.type == "moe" and self.moe is None and self.projector.moe_config is None:
            raise invalid("projector", "type 'moe' needs `moe` (the MoE config)")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype) if self.dtype else None

    def build(self):
        from .modeling import build_model

        return build_model(self)


class LlavaSmoeConfig(PreTrainedConfig):
    """Composite config; the component configs are plain dicts of their configs.

    vision_config: `VisionTowerConfig` as data (resolved: rebuildable without files).
    projector_config: `ProjectorConfig` as data.
    text_config: the language model's transformers config (nested, with `model_type`).
    image_token_id: the id of the placeholder that marks where an image's features go.
    """

    model_type = "llava_smoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    vision_config: dict | None = None
    projector_config: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    format_version: int = FORMAT_VERSION
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        v1 = {key: kwargs.pop(key) for key in ("moe_config", "moe_placement", *_V1_PROCESSOR_KEYS) if key in kwargs}
        super().__post_init__(**kwargs)
        if v1 or self.format_version == 1:
            _upgrade_v1(self, v1)
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"llava_smoe config format_version {self.format_version} is newer than this code "
                             f"reads ({FORMAT_VERSION}): upgrade llava-smoe")
        # The language model owns its embedding tying; mirror it so transformers' tying logic agrees.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.projector_config is None:
            self.projector_config = dump(ProjectorConfig())
        if self.image_token_id is not None and self.text_config is not None:
            vocab = self.text_config.vocab_size
            if not 0 <= self.image_token_id < vocab:
                raise ValueError(
                    f"image_token_id={self.image_token_id} is outside the language model's vocabulary "
                    f"(vocab_size={vocab}): add the image token to the tokenizer and set "
                    "text_config.vocab_size to len(tokenizer)"
                )


def _upgrade_v1(config: LlavaSmoeConfig, v1: dict[str, Any]) -> None:
    """Format 1 -> 2: the model-level MoE config and placement become the components' own records;
    the processor's facts (template, image token, preprocessing) are dropped from the model config
    (the checkpoint's processor_config.json holds them)."""
    from .surgery import LM_MOE_KEY

    moe = v1.get("moe_config")
    placement = parse(MoEPlacement, v1.get("moe_placement") or {}, ("moe_placement",))
    vision = {k: v for k, v in (config.vision_config or {}).items() if k not in ("image_mean", "image_std")}
    if moe is not None:
        moe = dump(parse(MoEConfig, moe, ("moe_config",)))
        lm_layers = resolve_layers(placement.language_model, config.text_config.num_hidden_layers)
        if lm_layers:
            setattr(config.text_config, LM_MOE_KEY, {"moe_config": moe, "layers": lm_layers})
        if placement.vision_tower != "none":
            vision["moe"] = {"moe_config": moe, "layers": placement.vision_tower}
        if (config.projector_config or {}).get("type") == "moe":
            config.projector_config = {**config.projector_config, "moe_config": moe}
    config.vision_config = vision
    config.format_version = FORMAT_VERSION
