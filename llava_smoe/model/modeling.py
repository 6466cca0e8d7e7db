"""LlavaSmoeForConditionalGeneration: vision tower -> projector -> causal language model.

The image placeholder's positions in the token sequence are replaced by the projected image
features; everything else is the language model's own forward (loss, KV cache, generation).
MoE layers are built from the config at construction, so a checkpoint whose FFNs were
upcycled reloads from its config alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import LlavaSmoeConfig, MoEPlacement, VLMConfig
from .language_model import (
    build_language_model,
    decoder_layers,
    load_language_model,
    resolve_layers,
    upcycle_blocks,
)
from .projector import ProjectorConfig, build_projector, upcycle_projector
from .vision import VisionTower, build_vision_tower

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "auto")


class LlavaSmoePreTrainedModel(PreTrainedModel):
    config_class = LlavaSmoeConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
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
            raise ValueError("LlavaSmoeConfig.image_token_id is not set (the tokenizer id of config.image_token)")
        attn = config._attn_implementation
        if vision_tower is None:
            vision_tower = build_vision_tower(config.vision_config, load_weights=False, attn_implementation=attn)
        if language_model is None:
            language_model = build_language_model(config.text_config, attn_implementation=attn)
        self.vision_tower = vision_tower
        self.language_model = language_model
        if self.language_model.config is not config.text_config:
            config.text_config = self.language_model.config  # one object: embedding resizes stay visible
        moe_config = config.moe()
        self.projector = build_projector(
            config.projector_config, self.vision_tower.hidden_size, config.text_config.hidden_size, moe_config,
            num_tokens=self.vision_tower.num_image_tokens,
        )
        if config.num_image_tokens not in (None, self.vision_tower.num_image_tokens):
            raise ValueError(
                f"config.num_image_tokens={config.num_image_tokens} but the vision tower yields "
                f"{self.vision_tower.num_image_tokens} tokens per image"
            )
        config.num_image_tokens = self.vision_tower.num_image_tokens
        self.post_init()
        # After post_init: transformers' weight init must not touch upcycled experts or routers.
        if moe_config is not None:
            self._install_moe(moe_config, config.placement())
        # The placeholder is input-only: generating it would make the next (uncached) step unsplicable.
        self.generation_config.suppress_tokens = [config.image_token_id]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("use_safetensors", True)  # never fall back to unpickling *.bin weights
        model = super().from_pretrained(*args, **kwargs)
        model.vision_tower.apply_freeze()  # loading creates fresh parameters, trainable by default
        return model

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

    # -- MoE surgery --
    def _install_moe(self, moe_config, placement: MoEPlacement) -> None:
        lm_layers = decoder_layers(self.language_model)
        lm_ids = resolve_layers(placement.language_model, len(lm_layers), where="moe_placement.language_model")
        blocks = self.vision_tower.blocks()
        # Blocks after the feature layer never reach the output: "all"/"every_other" stop there.
        used = self.vision_tower.feature_block + 1
        spec = placement.vision_tower
        vt_ids = resolve_layers(spec, used if isinstance(spec, str) else len(blocks),
                                where="moe_placement.vision_tower")
        unused = [i for i in vt_ids if i >= used]
        if unused:
            raise ValueError(
                f"moe_placement.vision_tower: blocks {unused} come after the feature layer "
                f"(block {self.vision_tower.feature_block}) and never affect the output; drop them"
            )
        upcycle_blocks(lm_layers, lm_ids, moe_config, where="language model")
        upcycle_blocks(blocks, vt_ids, moe_config, where="vision tower")

    def apply_moe(self, moe_config, placement: MoEPlacement | dict | None = None, *,
                  upcycle_projector_mlp: bool = False) -> None:
        """Upcycle this dense model's FFNs into MoE layers (experts start as copies) and record it.

        upcycle_projector_mlp: also turn an mlp3x_gelu projector into the "moe" projector.
        """
        from llava_smoe.moe import MoEConfig

        if self.config.moe_config is not None:
            raise ValueError("this model already has MoE layers (config.moe_config is set); surgery applies once")
        moe_config = MoEConfig.from_dict(moe_config) if isinstance(moe_config, dict) else moe_config
        if isinstance(placement, dict):
            placement = MoEPlacement.from_dict(placement)
        placement = placement or MoEPlacement()
        self._install_moe(moe_config, placement)
        if upcycle_projector_mlp:
            self.projector = upcycle_projector(self.projector, moe_config)
            self.config.projector_config = ProjectorConfig.from_dict(
                {**self.config.projector_config, "type": "moe"}
            ).to_dict()
        self.config.moe_config = moe_config.to_dict()
        self.config.moe_placement = placement.to_dict()

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
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        has_image: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, S] with `num_image_tokens` placeholders per image.

        pixel_values: [N, 3, H, W], one row per image in batch order (samples without an image
            contribute none); or [B, 3, H, W] together with has_image [B] (bool), whose False
            rows are ignored (a collated batch with dummy images for text-only samples).
        labels: [B, S]; image positions are always ignored (-100). `.loss` is the LM loss only.
        On decode steps (a non-empty cache, no pixel_values) tokens are embedded as they are.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        image_pos_BS = None
        if input_ids is not None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            prefill = past_key_values is None or past_key_values.get_seq_length() == 0
            if pixel_values is not None or prefill:
                inputs_embeds, image_pos_BS = self._merge_images(input_ids, inputs_embeds, pixel_values, has_image)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (the image placeholders mark where features go)")
        if labels is not None and image_pos_BS is not None:
            labels = labels.masked_fill(image_pos_BS, -100)

        groups = nullcontext()
        if image_pos_BS is not None and self.config.moe_config is not None:
            from llava_smoe.moe import token_groups

            groups = token_groups(self.language_model, image_pos_BS)  # text/image routing statistics
        with groups:
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )

    def _merge_images(self, input_ids: torch.Tensor, embeds_BSD: torch.Tensor, pixel_values: torch.Tensor | None,
                      has_image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image_pos_BS = input_ids == self.config.image_token_id
        if pixel_values is not None and has_image is not None:
            if has_image.shape != (input_ids.shape[0],):
                raise ValueError(f"has_image must have shape [{input_ids.shape[0]}], got {tuple(has_image.shape)}")
            pixel_values = pixel_values[has_image.to(pixel_values.device, torch.bool)]
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        T = self.config.num_image_tokens
        num_positions = int(image_pos_BS.sum())
        if num_positions != num_images * T:
            raise ValueError(
                f"the batch has {num_positions} image-token positions ({self.config.image_token!r}, id "
                f"{self.config.image_token_id}) but {num_images * T} image features ({num_images} images x {T} "
                "tokens): each image needs exactly num_image_tokens placeholders"
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
    cfg = VLMConfig.from_dict(config) if isinstance(config, dict) else config
    attn = resolve_attn_implementation(cfg.attn_implementation)
    dtype = cfg.torch_dtype
    tower = build_vision_tower(cfg.vision, load_weights=True, attn_implementation=attn, dtype=dtype)
    if cfg.language_model.get("name_or_path"):
        lm = load_language_model(cfg.language_model["name_or_path"], attn_implementation=attn, dtype=dtype)
    else:
        lm = build_language_model(cfg.language_model["config"], attn_implementation=attn, dtype=dtype)
    if cfg.vocab_size is not None and cfg.vocab_size != lm.config.vocab_size:
        lm.resize_token_embeddings(cfg.vocab_size)
    resolved = tower.resolved_config()
    model_config = LlavaSmoeConfig(
        vision_config=resolved.to_dict(),
        projector_config=cfg.projector.to_dict(),
        text_config=lm.config,
        moe_config=cfg.moe.to_dict() if cfg.moe is not None and not cfg.upcycle_projector else None,
        moe_placement=cfg.moe_placement.to_dict(),
        image_token=cfg.image_token,
        image_token_id=cfg.image_token_id,
        num_image_tokens=tower.num_image_tokens,
        chat_template_name=cfg.chat_template_name,
        chat_template=cfg.chat_template,
        image_size=tower.image_size,
        image_mean=list(tower.image_mean),
        image_std=list(tower.image_std),
        image_pad_mode=cfg.image_pad_mode,
        attn_implementation=attn,
    )
    # __init__ upcycles the loaded FFNs named by the placement (and builds a "moe" projector);
    # turning a dense mlp3x_gelu projector into experts happens after, on the built model.
    model = LlavaSmoeForConditionalGeneration(model_config, vision_tower=tower, language_model=lm)
    if cfg.moe is not None and cfg.upcycle_projector:
        model.apply_moe(cfg.moe, cfg.moe_placement, upcycle_projector_mlp=True)
    if dtype is not None:
        model.to(dtype)
    return model


def load_model(path: str, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
               attn_implementation: str = "sdpa") -> LlavaSmoeForConditionalGeneration:
    """Load a saved model (safetensors only; nothing is inferred from the folder name)."""
    attn = resolve_attn_implementation(attn_implementation, device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = LlavaSmoeForConditionalGeneration.from_pretrained(
        path, dtype=dtype or torch.float32, use_safetensors=True, attn_implementation=attn
    )
    if device is not None:
        model.to(device)
    return model.eval()
