"""LlavaSmoeForConditionalGeneration: vision tower -> projector -> causal language model.

The image placeholder's positions in the token sequence are replaced by the projected image
features; everything else is the language model's own forward (loss, KV cache, generation).
MoE layers are built from the components' configs at construction, so a checkpoint whose FFNs
were upcycled reloads from its config alone.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava_smoe.config import ConfigError, dump, parse
from llava_smoe.moe import MoELayer, token_groups

from . import surgery
from .configuration import LlavaSmoeConfig, VLMConfig
from .language_model import build_language_model, load_language_model
from .projector import ProjectorConfig
from .vision import VisionTower, VisionTowerConfig

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "auto")


class LlavaSmoePreTrainedModel(PreTrainedModel):
    config_class = LlavaSmoeConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class LlavaSmoeForConditionalGeneration(LlavaSmoePreTrainedModel, GenerationMixin):
    """Submodules: `vision_tower` (VisionTower), `projector`, `language_model` (a causal LM).

    `vision_tower` / `language_model` may be passed in already built (with pretrained weights);
    otherwise they are built from the config with random weights (from_pretrained then loads).
    """

    def __init__(self, config: LlavaSmoeConfig, *, vision_tower: VisionTower | None = None,
                 language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if config.vision_config is None or config.text_config is None:
            raise ValueError("LlavaSmoeConfig needs vision_config and text_config to build a model")
        if config.image_token_id is None:
            raise ValueError("LlavaSmoeConfig.image_token_id is not set (the tokenizer id of the image token)")
        attn = config._attn_implementation
        vision_config = parse(VisionTowerConfig, config.vision_config, ("vision_config",))
        if vision_tower is None:
            vision_tower = vision_config.build(load_weights=False, attn_implementation=attn)
        if language_model is None:
            language_model = build_language_model(config.text_config, attn_implementation=attn)
        self.vision_tower = vision_tower
        self.language_model = language_model
        if self.language_model.config is not config.text_config:
            config.text_config = self.language_model.config  # one object: embedding resizes stay visible
        self.projector = parse(ProjectorConfig, config.projector_config, ("projector_config",)).build(
            self.vision_tower.hidden_size, config.text_config.hidden_size, num_tokens=self.vision_tower.num_image_tokens)
        self.post_init()
        # After post_init: transformers' weight init must not touch the tower's MoE layers.
        surgery.install_from_config(self, vision_config.moe)
        self.refresh_moe_layers()
        # transformers 5.24 renamed the language models' `past_key_values` argument to `cache`.
        lm_arguments = inspect.signature(type(self.language_model).forward).parameters
        self._cache_argument = "cache" if "cache" in lm_arguments else "past_key_values"
        # The placeholder is input-only: generating it would make the next (uncached) step unsplicable.
        self.generation_config.suppress_tokens = [config.image_token_id]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("use_safetensors", True)  # never fall back to unpickling *.bin weights
        model = super().from_pretrained(*args, **kwargs)
        model.vision_tower.apply_freeze()  # loading creates fresh parameters, trainable by default
        return model

    @property
    def num_image_tokens(self) -> int:
        """Image-token positions per image: the vision tower's token count."""
        return self.vision_tower.num_image_tokens

    def refresh_moe_layers(self) -> None:
        """Re-find the language model's MoE layers (after surgery); forward labels their tokens."""
        self._lm_moe_layers = [m for m in self.language_model.modules() if isinstance(m, MoELayer)]

    def set_vision_freeze(self, freeze: bool) -> None:
        """Freeze or unfreeze the vision tower's dense weights, recorded in the config for later stages."""
        self.vision_tower.set_freeze(freeze)
        self.config.vision_config = {**self.config.vision_config, "freeze": freeze}

    # -- embeddings (GenerationMixin and resize_token_embeddings go through these) --
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # -- forward --
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, D_lm]."""
        return self.projector(self.vision_tower(pixel_values))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, S] with `num_image_tokens` placeholders per image.

        pixel_values: [N, 3, H, W], one row per image in batch order (samples without an image
            contribute none).
        labels: [B, S]; image positions are always ignored (-100). `.loss` is the LM loss only:
            the mean over supervised tokens, or their sum divided by `num_items_in_batch` when
            given (the trainer's token-weighted loss over an optimizer step).
        On decode steps (a non-empty cache, no pixel_values) tokens are embedded as they are.
        `cache`: the KV cache (transformers' name since 5.24; `past_key_values` is accepted too).
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_pos_BS = None
        if input_ids is not None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            prefill = cache is None or cache.get_seq_length() == 0
            if pixel_values is not None or prefill:
                inputs_embeds, image_pos_BS = self._merge_images(input_ids, inputs_embeds, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (the image placeholders mark where features go)")
        if labels is not None and image_pos_BS is not None:
            labels = labels.masked_fill(image_pos_BS, -100)

        groups = nullcontext()
        if image_pos_BS is not None and self._lm_moe_layers:
            groups = token_groups(self._lm_moe_layers, image_pos_BS)  # text/image routing statistics
        with groups:
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{self._cache_argument: cache},
                **kwargs,
            )

    def _merge_images(self, input_ids: torch.Tensor, embeds_BSD: torch.Tensor,
                      pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image_pos_BS = input_ids == self.config.image_token_id
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        T = self.num_image_tokens
        num_positions = int(image_pos_BS.sum())
        if num_positions != num_images * T:
            raise ValueError(
                f"the batch has {num_positions} image-token positions (id {self.config.image_token_id}) but "
                f"{num_images * T} image features ({num_images} images x {T} tokens): each image needs exactly "
                "num_image_tokens placeholders"
            )
        if num_images == 0:
            return embeds_BSD, None
        per_row_B = image_pos_BS.sum(dim=1)
        bad_rows = (per_row_B % T != 0).nonzero().flatten().tolist()
        if bad_rows:
            raise ValueError(
                f"samples {bad_rows} have {per_row_B[bad_rows].tolist()} image-token positions, not a multiple "
                f"of num_image_tokens={T}"
            )
        features_NTD = self.get_image_features(pixel_values)
        embeds_BSD = embeds_BSD.masked_scatter(image_pos_BS.unsqueeze(-1), features_NTD.to(embeds_BSD.dtype))
        return embeds_BSD, image_pos_BS


def resolve_attn_implementation(requested: str, device: torch.device | str | None = None) -> str:
    """"sdpa" (default), "eager", "flash_attention_2" (needs flash-attn and CUDA) or "auto"."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    try:
        import flash_attn  # noqa: F401

        have_flash = True
    except ImportError:
        have_flash = False
    if requested == "auto":
        return "flash_attention_2" if have_flash and on_cuda else "sdpa"
    if requested == "flash_attention_2" and not (have_flash and on_cuda):
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (pip install "
            "'llava-smoe[gpu]') and a CUDA device; use 'sdpa' (or 'auto') otherwise"
        )
    return requested


def build_model(config: VLMConfig | dict) -> LlavaSmoeForConditionalGeneration:
    """Assemble a model from pretrained or config-built parts (see VLMConfig), upcycling if asked."""
    cfg = parse(VLMConfig, config)
    if cfg.image_token_id is None:
        raise ConfigError("required to build a model (the tokenizer id of the image token)", ("image_token_id",))
    attn = resolve_attn_implementation(cfg.attn_implementation)
    dtype = cfg.torch_dtype
    try:
        tower = cfg.vision.build(load_weights=True, attn_implementation=attn, dtype=dtype)
    except ConfigError as exc:
        raise exc.within("vision") from None
    spec = cfg.language_model
    if spec.name_or_path is not None:
        lm = load_language_model(spec.name_or_path, attn_implementation=attn, dtype=dtype)
    else:
        lm = build_language_model(spec.resolved_config(), attn_implementation=attn, dtype=dtype)
    if cfg.vocab_size is not None and cfg.vocab_size != lm.config.vocab_size:
        lm.resize_token_embeddings(cfg.vocab_size)
    projector = cfg.projector
    if projector.type == "moe" and projector.moe_config is None:
        projector = parse(ProjectorConfig, {**dump(projector), "moe_config": dump(cfg.moe)})
    model_config = LlavaSmoeConfig(
        vision_config=dump(tower.resolved_config()),
        projector_config=dump(projector),
        text_config=lm.config,
        image_token_id=cfg.image_token_id,
        attn_implementation=attn,
    )
    # Parts arrive built (with their weights); upcycling into MoE layers happens on the assembled model.
    model = LlavaSmoeForConditionalGeneration(model_config, vision_tower=tower, language_model=lm)
    if cfg.moe is not None:
        placement = cfg.moe_placement
        surgery.upcycle(model, cfg.moe, placement.language_model, placement.vision_tower,
                        projector=cfg.upcycle_projector)
    if dtype is not None:
        model.to(dtype)
    return model


# Checkpoints load through the Auto classes without remote code (`import llava_smoe` has this
# module imported as soon as transformers' auto module is).
AutoConfig.register(LlavaSmoeConfig.model_type, LlavaSmoeConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaSmoeConfig, LlavaSmoeForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(LlavaSmoeConfig, LlavaSmoeForConditionalGeneration, exist_ok=True)
