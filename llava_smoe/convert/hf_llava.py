"""Export to, and import from, the standard transformers LLaVA format.

The format is `LlavaForConditionalGeneration` (`config.json` with `vision_config`,
`text_config`, the projector's activation and bias, `image_token_index`, the feature layer and
selection) plus a `LlavaProcessor` (tokenizer, Jinja chat template, image processor, tokens per
image). transformers, vLLM and SGLang load it without any code of ours.

What maps, and how (each piece checked against the transformers 5 modules it becomes):
- vision: transformers CLIP / SigLIP towers as they are; an open_clip ViT becomes a
  `CLIPVisionModel` (patch embedding, class and position embeddings, pre-norm, blocks with
  fused q/k/v split into three projections) when it has none of the parts CLIP lacks;
- projector: mlp2x_gelu is `linear_1`, GELU, `linear_2`; linear is `linear_1` followed by an
  identity activation and an identity `linear_2`;
- language model: dense stays its own family. MoE layers whose inference routing is softmax
  top-k with renormalised weights (smoe, competesmoe, mot once converted) become a family
  with the same routing: a Qwen2 LM -> Qwen2-MoE (its shared expert given width 0), Qwen3 ->
  Qwen3-MoE, Llama -> Mixtral with MoE in every layer, else Qwen2-MoE without q/k/v biases;
  `mlp_only_layers` lists the dense layers; expert weights are stored fused and transposed
  ([E, 2F, D] gate-then-up, [E, D, F]).
- processor: the chat template as Jinja (rendering exactly our prompts), the image token and
  its count, and `LlavaImageProcessor` settings that give our pixels (pad to square with the
  mean colour, resize, rescale, normalise).

`llava_smoe.json` beside them keeps what the standard format cannot say (the processor config and
the MoE record: the router trained with, its options), so `import` restores our own exports exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_smoe.config import dump, parse

SIDECAR = "llava_smoe.json"
SIDECAR_VERSION = 1
SOFTMAX_TOPK_ROUTERS = ("smoe", "competesmoe")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
# Keys of a saved config that describe the file, not the architecture.
_FILE_KEYS = ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype")
# ... and those a config of another family must not inherit (its own type, its per-layer list).
_FAMILY_KEYS = (*_FILE_KEYS, "model_type", "layer_types", "output_attentions")


class ConversionError(ValueError):
    """A checkpoint the other format cannot hold (with the reason), or a conversion that failed its check."""


# -- export -----------------------------------------------------------------------------------------
def export_hf_llava(model: Any, processor: Any, out_dir: str | Path, *, allow_tokenization_drift: bool = False) -> Path:
    """Write `model` + `processor` as a transformers LLaVA folder, then check that transformers
    builds the same prompts and pixels from it (token drift is an error unless allowed)."""
    from transformers import GenerationConfig, LlavaConfig

    from llava_smoe.model.surgery import decoder_layers, moe_of

    vision_config, strategy, tensors = _export_vision(model.vision_tower)
    act, bias, projector = _export_projector(model)
    text_config, text_tensors = _export_language_model(model.language_model)
    tensors.update(projector)
    tensors.update(text_tensors)
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=model.config.image_token_id, image_seq_length=model.num_image_tokens,
        projector_hidden_act=act, multimodal_projector_bias=bias, vision_feature_select_strategy=strategy,
        vision_feature_layer=model.vision_tower.config.feature_layer,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    hf = _as_transformers_model(config, tensors)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = processor.tokenizer
    hf.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=list(processor.stop_token_ids),
                                            pad_token_id=processor.pad_token_id)
    hf.save_pretrained(out)  # transformers writes its canonical layout (the one vLLM and SGLang read)
    _export_processor(processor, config, out)
    sidecar = {"format_version": SIDECAR_VERSION, "processor": dump(processor.config),
               "language_model_moe": dump(moe_of(decoder_layers(model.language_model)))}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    check_exported_processor(processor, out, allow_tokenization_drift=allow_tokenization_drift)
    return out


def _export_vision(tower: Any) -> tuple[Any, str, dict[str, torch.Tensor]]:
    from llava_smoe.model.surgery import moe_of
    from llava_smoe.model.vision import HFVisionTower

    if moe_of(tower.blocks()) is not None:
        raise ConversionError("the vision tower has MoE layers, which the standard LLaVA format has no place for")
    strategy = "default" if tower.has_cls_token and tower.config.feature_select == "patch" else "full"
    if isinstance(tower, HFVisionTower):
        config = tower.model.config
        if config.model_type == "siglip_vision_model":
            config.vision_use_head = False  # the pooling head never reaches the language model
        return config, strategy, {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    config, weights = open_clip_to_hf_clip(tower.model)
    return config, strategy, {f"model.vision_tower.{k}": v for k, v in weights.items()}


def open_clip_to_hf_clip(visual: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """An open_clip ViT as a transformers `CLIPVisionModel` (config, state dict); refused when
    it has parts CLIP has not (layer scale, attention pooling, no pre-norm, biased patches, ...)."""
    from open_clip.transformer import LayerNorm as OpenClipLayerNorm
    from transformers import CLIPVisionConfig

    problems = []
    if not isinstance(getattr(visual, "ln_pre", None), (nn.LayerNorm, OpenClipLayerNorm)):
        problems.append("no LayerNorm before the blocks (no_ln_pre)")
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if visual.conv1.bias is not None:
        problems.append("a biased patch embedding")
    if not isinstance(visual.positional_embedding, nn.Parameter):
        problems.append("non-learned position embeddings")
    blocks = list(visual.transformer.resblocks)
    for block in blocks:
        if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            problems.append("layer scale")
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            problems.append(f"{type(getattr(block, 'attn', None)).__name__} attention (not fused q/k/v multi-head)")
        if getattr(block, "ln_attn", nn.Identity()).__class__ is not nn.Identity:
            problems.append("a norm inside attention")
    activations = {type(block.mlp.gelu).__name__ for block in blocks if hasattr(block.mlp, "gelu")}
    if activations - {"GELU", "QuickGELU"} or len(activations) != 1:
        problems.append(f"activation {sorted(activations)}")
    elif activations == {"GELU"} and blocks[0].mlp.gelu.approximate != "none":
        problems.append("tanh-approximated GELU")
    if problems:
        raise ConversionError(f"this open_clip ViT cannot become a CLIP vision model: it has {', '.join(sorted(set(problems)))}")
    width, heads = visual.transformer.width, blocks[0].attn.num_heads
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=heads, image_size=int(visual.image_size[0]), patch_size=int(visual.patch_size[0]),
        hidden_act="quick_gelu" if activations == {"QuickGELU"} else "gelu", layer_norm_eps=visual.ln_pre.eps,
        num_channels=visual.conv1.in_channels,
    )
    w: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
    }
    for name, norm in (("pre_layrnorm", visual.ln_pre), ("post_layernorm", visual.ln_post)):
        w[f"{name}.weight"], w[f"{name}.bias"] = norm.weight, norm.bias
    for i, block in enumerate(blocks):
        p = f"encoder.layers.{i}."
        q, k, v = (t.clone() for t in block.attn.in_proj_weight.chunk(3))  # own storage each, for safetensors
        qb, kb, vb = (t.clone() for t in block.attn.in_proj_bias.chunk(3))
        for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb),
                                   ("out_proj", block.attn.out_proj.weight, block.attn.out_proj.bias)):
            w[p + f"self_attn.{name}.weight"], w[p + f"self_attn.{name}.bias"] = weight, bias
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            norm = getattr(block, ours)
            w[p + f"{theirs}.weight"], w[p + f"{theirs}.bias"] = norm.weight, norm.bias
        for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
            lin = getattr(block.mlp, ours)
            w[p + f"mlp.{theirs}.weight"], w[p + f"mlp.{theirs}.bias"] = lin.weight, lin.bias
    return config, w


def _export_projector(model: Any) -> tuple[str, bool, dict[str, torch.Tensor]]:
    from llava_smoe.model.projector import PositionedProjector, ProjectorConfig

    cfg = parse(ProjectorConfig, model.config.projector_config)
    if isinstance(model.projector, PositionedProjector):
        raise ConversionError("the projector adds a learned vector per image-token position (position_embedding), "
                              "which the standard LLaVA format has no place for; train without it to export")
    p = "model.multi_modal_projector."
    if cfg.type == "mlp2x_gelu":
        first, second = model.projector[0], model.projector[2]
        tensors = {p + "linear_1.weight": first.weight, p + "linear_2.weight": second.weight}
        if cfg.bias:
            tensors.update({p + "linear_1.bias": first.bias, p + "linear_2.bias": second.bias})
        return "gelu", cfg.bias, tensors
    if cfg.type == "linear":
        lin = model.projector
        D = lin.out_features
        tensors = {p + "linear_1.weight": lin.weight, p + "linear_2.weight": torch.eye(D, dtype=lin.weight.dtype)}
        if cfg.bias:
            tensors.update({p + "linear_1.bias": lin.bias, p + "linear_2.bias": torch.zeros(D, dtype=lin.weight.dtype)})
        return "linear", cfg.bias, tensors
    raise ConversionError(f"projector {cfg.type!r} has no counterpart in the standard LLaVA format, whose projector "
                          "is Linear -> activation -> Linear: export supports 'mlp2x_gelu' and 'linear'")


def _dense_fields(config: Any, target_class: type) -> dict[str, Any]:
    """The fields of a dense LM config that `target_class` (a transformers config) also has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(target_class)}
    return {k: v for k, v in config.to_dict().items() if k in names and k not in _FAMILY_KEYS}


def _moe_family(config: Any, moe: Any, num_layers: int) -> tuple[str, dict[str, Any]]:
    """The transformers MoE family for this LM and placement, and its MoE fields; refused with
    the reason when routing or architecture has no exact counterpart."""
    from llava_smoe.moe.config import resolve_layers

    c = moe.moe_config
    reasons = {
        "remoe": "ReMoE routes through ReLU gates (a varying number of experts per token, weights not normalised)",
        "sigmoid": "the sigmoid router picks experts on sigmoid scores plus a per-expert bias",
        "xmoe": "X-MoE routes by cosine similarity in a low-dimensional space, divided by a temperature",
        "mot": "Mixture of Tokens mixes tokens across the sequences of a batch (convert it to token choice first: a "
               "vlm stage's mot_to_token_choice, or llava_smoe.moe.convert_mot_to_token_choice, then export)",
    }
    if c.router not in SOFTMAX_TOPK_ROUTERS:
        why = reasons.get(c.router, f"router {c.router!r} is not softmax top-k")
        raise ConversionError(f"{why}; the transformers MoE families this format uses (Mixtral, Qwen2-MoE, Qwen3-MoE) "
                              "route by softmax top-k with renormalised weights, so it cannot be exported")
    if c.num_shared_experts:
        raise ConversionError(f"num_shared_experts={c.num_shared_experts}: Qwen2-MoE gates its shared expert by a "
                              "sigmoid where ours adds it ungated, and Mixtral and Qwen3-MoE have none")
    layers = resolve_layers(moe.layers, num_layers)
    fields = {"num_experts_per_tok": c.top_k, "mlp_only_layers": [i for i in range(num_layers) if i not in layers]}
    kind = config.model_type
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        raise ConversionError(f"the {kind} language model uses sliding-window attention, which the exported MoE "
                              "family would place differently")
    if kind == "qwen2":
        return "qwen2_moe", {**fields, "num_experts": c.num_experts, "norm_topk_prob": True, "decoder_sparse_step": 1,
                             "shared_expert_intermediate_size": 0, "qkv_bias": True}
    if kind == "qwen3":
        return "qwen3_moe", {**fields, "num_experts": c.num_experts, "norm_topk_prob": True, "decoder_sparse_step": 1}
    if kind in ("llama", "mistral"):
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ConversionError(f"the {kind} language model has attention or MLP biases, which Mixtral and "
                                  "Qwen2-MoE's dense layers lack")
        if len(layers) == num_layers:  # Mixtral: MoE in every layer, renormalised softmax top-k
            return "mixtral", {"num_local_experts": c.num_experts, "num_experts_per_tok": c.top_k}
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if head_dim != config.hidden_size // config.num_attention_heads:
            raise ConversionError("Qwen2-MoE (for MoE in some layers only) derives head_dim from the width; this "
                                  f"model's head_dim is {head_dim}")
        return "qwen2_moe", {**fields, "num_experts": c.num_experts, "norm_topk_prob": True, "decoder_sparse_step": 1,
                             "shared_expert_intermediate_size": 0, "qkv_bias": False}
    raise ConversionError(f"no transformers MoE family has the {kind} architecture with softmax top-k routing "
                          "(supported: qwen2 -> Qwen2-MoE, qwen3 -> Qwen3-MoE, llama -> Mixtral or Qwen2-MoE)")


def _export_language_model(lm: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import AutoConfig

    from llava_smoe.model.surgery import decoder_layers, moe_of
    from llava_smoe.moe import MoELayer

    blocks = decoder_layers(lm)
    config, moe = lm.config, moe_of(blocks)  # from the modules (a conversion may not be recorded yet)
    state = lm.state_dict()
    tensors = {_hf_lm_key(k): v for k, v in state.items() if ".mlp.experts." not in k and ".mlp.router." not in k}
    if moe is None:
        return AutoConfig.for_model(config.model_type, **_dense_fields(config, type(config))), tensors
    family, fields = _moe_family(config, moe, len(blocks))
    target = type(AutoConfig.for_model(family))
    layer = next(b.mlp for b in blocks if isinstance(b.mlp, MoELayer))
    if layer.experts.activation != config.hidden_act:
        raise ConversionError(f"the experts use {layer.experts.activation!r}, the family's experts use the model's "
                              f"hidden_act {config.hidden_act!r}")
    size = {"mixtral": "intermediate_size"}.get(family, "moe_intermediate_size")
    dense = _dense_fields(config, target)
    if family == "mixtral":
        dense.pop("intermediate_size", None)
    text_config = AutoConfig.for_model(family, **{**dense, **fields, size: layer.ffn_size})
    for i, block in enumerate(blocks):
        if not isinstance(block.mlp, MoELayer):
            continue
        p = f"model.language_model.layers.{i}.mlp."
        tensors[p + "gate.weight"] = block.mlp.router.weight_ED
        tensors[p + "experts.gate_up_proj"] = block.mlp.experts.w_gate_up_EDF2.transpose(1, 2)
        tensors[p + "experts.down_proj"] = block.mlp.experts.w_down_EFD.transpose(1, 2)
        if family == "qwen2_moe":  # a shared expert of width 0: it adds exactly nothing
            D, like = config.hidden_size, block.mlp.router.weight_ED
            tensors[p + "shared_expert.gate_proj.weight"] = like.new_zeros(0, D)
            tensors[p + "shared_expert.up_proj.weight"] = like.new_zeros(0, D)
            tensors[p + "shared_expert.down_proj.weight"] = like.new_zeros(D, 0)
            tensors[p + "shared_expert_gate.weight"] = like.new_zeros(1, D)
    return text_config, tensors


def _hf_lm_key(key: str) -> str:
    """A key of our causal LM's state dict as `LlavaForConditionalGeneration` names it."""
    return key if key.startswith("lm_head.") else "model.language_model." + key.removeprefix("model.")


def _as_transformers_model(config: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`LlavaForConditionalGeneration(config)` holding `tensors` (no copy), which must be exactly
    the parameters transformers builds from `config`."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    if config.tie_word_embeddings:
        tensors = {**tensors, "lm_head.weight": tensors["model.language_model.embed_tokens.weight"]}
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or extra or wrong:
        raise ConversionError(f"the converted weights do not match LlavaForConditionalGeneration: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, wrong shape {[(k, got[k], expected[k]) for k in wrong[:3]]}")
    hf.load_state_dict({k: v.detach().contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    return hf


def _export_processor(processor: Any, config: Any, out: Path) -> None:
    from transformers import LlavaImageProcessor, LlavaProcessor

    from .chat_template import jinja_chat_template

    image = processor.image_config
    square = {"height": image.image_size, "width": image.image_size}
    crop = image.mode == "center_crop"
    image_processor = LlavaImageProcessor(
        do_pad=image.mode == "pad", do_resize=True, size={"shortest_edge": image.image_size} if crop else square,
        resample=_RESAMPLE[image.resample], do_center_crop=crop, crop_size=square, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(image.mean), image_std=list(image.std),
        do_convert_rgb=True)
    hf = LlavaProcessor(image_processor=image_processor, tokenizer=processor.tokenizer,
                        chat_template=jinja_chat_template(processor), patch_size=config.vision_config.patch_size,
                        vision_feature_select_strategy=config.vision_feature_select_strategy,
                        image_token=processor.image_token,
                        num_additional_image_tokens=1 if config.vision_config.model_type.startswith("clip") else 0)
    hf.save_pretrained(out)


# Conversations the exported processor must tokenise as ours does (with images of three shapes).
_PROBES = [
    [("user", "What shape is in the image?", 1)],
    [("system", "Answer briefly.", 0), ("user", "How many squares are there?", 0)],
    [("user", "What is this?", 1), ("assistant", "A red circle on the left.", 0), ("user", "And this one?", 1)],
]


def check_exported_processor(processor: Any, out: Path, *, allow_tokenization_drift: bool = False) -> None:
    """transformers' processor loaded from `out` (PIL backend) gives our pixels and, unless
    allowed to drift, our token ids for a few conversations."""
    from PIL import Image
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(str(out), backend="pil")
    images = [Image.new("RGB", (40, 24), (200, 30, 30)), Image.effect_noise((23, 41), 60).convert("RGB"),
              Image.linear_gradient("L").resize((processor.image_config.image_size,) * 2).convert("RGB")]
    ours = processor.preprocess_images(images)
    theirs = hf.image_processor(images, return_tensors="pt")["pixel_values"]
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-5):
        raise ConversionError("transformers' image processor does not reproduce this checkpoint's pixels "
                              f"(max difference {(ours - theirs).abs().max().item() if ours.shape == theirs.shape else ours.shape})")
    for probe in _PROBES:
        if processor.config.template == "plain":
            probe = [probe[0]]
        messages = [{"role": r, "content": t} for r, t, _ in probe]
        expected = processor.build_generation_prompt(messages, has_image=[n for _, _, n in probe]).tolist()
        conversation = [{"role": r, "content": [{"type": "image"}] * n + [{"type": "text", "text": t}]}
                        for r, t, n in probe]
        text = hf.apply_chat_template(conversation, add_generation_prompt=True)
        got = hf(text=text, images=images[:sum(n for _, _, n in probe)] or None)["input_ids"][0]
        got = got.tolist() if hasattr(got, "tolist") else list(got)
        if got != expected and not allow_tokenization_drift:
            i = next(i for i, (a, b) in enumerate(zip([*expected, None], [*got, None])) if a != b)
            tok = processor.tokenizer
            raise ConversionError(
                f"the exported chat template renders the right text, but transformers tokenises it as a whole where "
                f"this checkpoint's processor tokenises each segment of template {processor.config.template!r} on its "
                f"own: at token {i}, {tok.convert_ids_to_tokens(expected[i:i + 3])} here vs "
                f"{tok.convert_ids_to_tokens(got[i:i + 3])} there. Templates whose turns end with special tokens "
                "(chatml, phi3) export exactly; pass --allow-tokenization-drift to export anyway")


# -- import -----------------------------------------------------------------------------------------
def import_hf_llava(src: str | Path, *, template: str | None = None, system_prompt: str | None = None) -> tuple[Any, Any]:
    """(model, processor) from a transformers LLaVA folder (llava-hf/llava-1.5-7b-hf's layout, or one
    written by `export_hf_llava`); weights keep their dtype."""
    from llava_smoe.model.configuration import LlavaSmoeConfig
    from llava_smoe.model.language_model import build_language_model
    from llava_smoe.model.modeling import LlavaSmoeForConditionalGeneration  # before transformers' names
    from llava_smoe.model.vision import VisionTowerConfig
    from llava_smoe.processing import LlavaSmoeProcessor, ProcessorConfig
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a transformers LLaVA folder)")
    config = AutoConfig.from_pretrained(src)
    if config.model_type != "llava":
        raise ConversionError(f"{src}: model_type {config.model_type!r}, expected 'llava' (LlavaForConditionalGeneration)")
    if not isinstance(config.vision_feature_layer, int):
        raise ConversionError(f"vision_feature_layer {config.vision_feature_layer} concatenates several layers; "
                              "llava-smoe feeds the projector one layer")
    vision_type = config.vision_config.model_type
    if vision_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ConversionError(f"vision tower {vision_type!r}: import supports CLIP and SigLIP towers")
    sidecar = json.loads((src / SIDECAR).read_text()) if (src / SIDECAR).is_file() else None
    hf = LlavaForConditionalGeneration.from_pretrained(src, dtype="auto", use_safetensors=True)
    state = hf.state_dict()

    vision_dict = {k: v for k, v in config.vision_config.to_dict().items() if k not in _FILE_KEYS}
    strategy = config.vision_feature_select_strategy
    tower = VisionTowerConfig(
        backend="hf", hf_config={**vision_dict, "model_type": vision_type}, feature_layer=config.vision_feature_layer,
        feature_select="cls_patch" if strategy == "full" and vision_type.startswith("clip") else "patch",
    ).build(load_weights=False, attn_implementation="sdpa")
    tower.model.load_state_dict({k.removeprefix("model.vision_tower."): v for k, v in state.items()
                                 if k.startswith("model.vision_tower.")}, strict=True)

    projector_cfg, projector_state = _import_projector(config, state)
    text_config, lm_state = _import_language_model(config.text_config, state,
                                                   sidecar.get("language_model_moe") if sidecar else None)
    lm = build_language_model(text_config, attn_implementation="sdpa")
    loaded = lm.load_state_dict(lm_state, strict=False)
    buffers = dict(lm.named_buffers())  # router state (e.g. CompeteSMoE's schedule position) starts afresh
    if loaded.unexpected_keys or any(k not in buffers for k in loaded.missing_keys):
        raise ConversionError(f"the language model's weights do not match its config: missing "
                              f"{[k for k in loaded.missing_keys if k not in buffers][:5]}, unexpected "
                              f"{loaded.unexpected_keys[:5]}")
    model = LlavaSmoeForConditionalGeneration(
        LlavaSmoeConfig(vision_config=dump(tower.resolved_config()), projector_config=dump(projector_cfg),
                        text_config=lm.config, image_token_id=config.image_token_index, attn_implementation="sdpa"),
        vision_tower=tower, language_model=lm)
    model.projector.load_state_dict(projector_state, strict=True)
    dtype = next(hf.parameters()).dtype
    model.to(dtype)
    model.vision_tower.apply_freeze()

    tokenizer = AutoTokenizer.from_pretrained(src)
    if sidecar is not None and template is None and system_prompt is None:
        processor_config = parse(ProcessorConfig, sidecar["processor"], (str(src / SIDECAR), "processor"))
    else:
        processor_config = ProcessorConfig(
            template=template or _detect_template(tokenizer, src), system_prompt=system_prompt,
            num_image_tokens=model.num_image_tokens, image_token=tokenizer.convert_ids_to_tokens(config.image_token_index),
            image=_import_image_processing(src, tower.image_size))
    processor = LlavaSmoeProcessor(tokenizer, processor_config)
    if processor.added_tokens:
        raise ConversionError(f"template {processor_config.template!r} needs tokens the tokenizer lacks "
                              f"({processor.added_tokens}); choose a template the checkpoint was trained with")
    from llava_smoe.pretrained import check_pair

    check_pair(model, processor, where=str(src))
    return model.eval(), processor


def _import_projector(config: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    from llava_smoe.model.projector import ProjectorConfig

    p = "model.multi_modal_projector."
    bias = config.multimodal_projector_bias
    if config.projector_hidden_act == "gelu":
        mapped = {"0.weight": state[p + "linear_1.weight"], "2.weight": state[p + "linear_2.weight"]}
        if bias:
            mapped.update({"0.bias": state[p + "linear_1.bias"], "2.bias": state[p + "linear_2.bias"]})
        return ProjectorConfig(type="mlp2x_gelu", bias=bias), mapped
    second = state[p + "linear_2.weight"]
    identity = config.projector_hidden_act == "linear" and torch.equal(second, torch.eye(second.shape[0], dtype=second.dtype))
    if identity and (not bias or not state[p + "linear_2.bias"].any()):
        mapped = {"weight": state[p + "linear_1.weight"]}
        if bias:
            mapped["bias"] = state[p + "linear_1.bias"]
        return ProjectorConfig(type="linear", bias=bias), mapped
    raise ConversionError(f"projector with activation {config.projector_hidden_act!r}: import supports GELU "
                          "(mlp2x_gelu) and the identity activation with an identity second layer (linear)")


_MOE_FAMILIES = {"qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "mixtral": "llama"}


def _import_language_model(text_config: Any, state: dict[str, torch.Tensor],
                           recorded_moe: dict | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our LM config (a dict with model_type) and its state dict, from the exported family."""
    from transformers import AutoConfig

    from llava_smoe.model.surgery import LM_MOE_KEY

    kind = text_config.model_type
    lm_state = {("model." + k.removeprefix("model.language_model.")) if k.startswith("model.language_model.") else k: v
                for k, v in state.items() if k.startswith(("model.language_model.", "lm_head."))}
    if kind not in _MOE_FAMILIES:
        return {**_dense_fields(text_config, type(text_config)), "model_type": kind}, lm_state
    dense_kind = _MOE_FAMILIES[kind]
    if kind == "qwen2_moe" and text_config.shared_expert_intermediate_size:
        raise ConversionError("Qwen2-MoE with a shared expert: ours adds shared experts ungated, Qwen2-MoE gates them")
    if kind != "mixtral" and not text_config.norm_topk_prob:
        raise ConversionError(f"{kind} without norm_topk_prob: its top-k weights are not renormalised as ours are")
    num_layers = text_config.num_hidden_layers
    if kind == "mixtral":
        layers, num_experts, ffn = list(range(num_layers)), text_config.num_local_experts, text_config.intermediate_size
    else:
        step = text_config.decoder_sparse_step
        layers = [i for i in range(num_layers) if i not in text_config.mlp_only_layers and (i + 1) % step == 0]
        num_experts, ffn = text_config.num_experts, text_config.moe_intermediate_size
    if kind == "qwen2_moe":
        dense_kind = "qwen2" if text_config.qkv_bias else "llama"
    target = type(AutoConfig.for_model(dense_kind))
    fields = {**_dense_fields(text_config, target), "model_type": dense_kind}
    moe = recorded_moe or {"moe_config": {"num_experts": num_experts, "top_k": text_config.num_experts_per_tok,
                                          "router": "smoe"}, "layers": layers}
    if moe["layers"] != layers and sorted(moe["layers"]) != layers:
        raise ConversionError(f"{SIDECAR} records MoE layers {moe['layers']}, the config has them in {layers}")
    dense_ffn = text_config.intermediate_size if kind != "mixtral" else ffn
    if ffn != dense_ffn:
        raise ConversionError(f"experts of width {ffn} and dense layers of width {dense_ffn}: llava-smoe's MoE layers "
                              "keep the width of the FFN they replace")
    fields[LM_MOE_KEY] = moe
    for i in layers:
        p, q = f"model.layers.{i}.mlp.", f"model.layers.{i}.mlp."
        lm_state[q + "router.weight_ED"] = lm_state.pop(p + "gate.weight")
        lm_state[q + "experts.w_gate_up_EDF2"] = lm_state.pop(p + "experts.gate_up_proj").transpose(1, 2).contiguous()
        lm_state[q + "experts.w_down_EFD"] = lm_state.pop(p + "experts.down_proj").transpose(1, 2).contiguous()
        for name in ("shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight",
                     "shared_expert_gate.weight"):
            lm_state.pop(p + name, None)
    return fields, lm_state


def _detect_template(tokenizer: Any, src: Path) -> str:
    """Our template for a checkpoint's chat template, from its markers."""
    jinja = getattr(tokenizer, "chat_template", None) or ""
    for path in (src / "chat_template.jinja", src / "chat_template.json"):
        if path.is_file():
            jinja = path.read_text()
    if "<|im_start|>" in jinja:
        return "chatml"
    if "<|user|>" in jinja and "<|end|>" in jinja:
        return "phi3"
    if "ASSISTANT:" in jinja and ("USER" in jinja or "upper()" in jinja):
        return "vicuna_v1"
    raise ConversionError(f"{src}: cannot tell which conversation template the checkpoint was trained with; "
                          "pass --template (one of chatml, phi3, vicuna_v1, plain, tokenizer)")


def _import_image_processing(src: Path, tower_size: int) -> Any:
    """Our image settings from the folder's image processor config (preprocessor_config.json, or
    processor_config.json's `image_processor` as transformers 5 writes it)."""
    from llava_smoe.processing import ImageProcessingConfig

    path = src / "preprocessor_config.json"
    if path.is_file():
        pp = json.loads(path.read_text())
    else:
        path = src / "processor_config.json"
        pp = json.loads(path.read_text()).get("image_processor") if path.is_file() else None
        if pp is None:
            raise FileNotFoundError(f"{src}: neither preprocessor_config.json nor processor_config.json holds the "
                                    "image processor's settings")
    size = pp.get("crop_size") if pp.get("do_center_crop") else pp.get("size")
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if side != tower_size:
        raise ConversionError(f"{path}: images become {side} px, the vision tower takes {tower_size}")
    if pp.get("do_pad"):
        mode = "pad"
    elif pp.get("do_center_crop"):
        mode = "center_crop"
    else:
        mode = "resize"
    resample = {v: k for k, v in _RESAMPLE.items()}.get(pp.get("resample", 3))
    if resample is None:
        raise ConversionError(f"{path}: resample {pp.get('resample')} is not nearest (0), bilinear (2) or bicubic (3)")
    return ImageProcessingConfig(image_size=side, mean=tuple(pp["image_mean"]), std=tuple(pp["image_std"]), mode=mode,
                                 resample=resample)
