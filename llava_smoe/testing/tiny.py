"""Tiny models (random weights, CPU, seconds): for tests and smoke runs of every stage.

`tiny_model_config(...)` returns the same kind of dict a training recipe's `vlm.model` holds,
with every part built from a config instead of a checkpoint; `save_tiny_checkpoint` writes a
whole checkpoint (model + processor) that the front ends load like any other.
"""

from __future__ import annotations

from typing import Any

CORPUS = [
    "What shape is in the image? A red circle on the left.",
    "How many squares are there? There are two blue squares.",
    "Describe the picture. A green triangle above a yellow star.",
    "Is the circle bigger than the square? Yes, the circle is bigger.",
    "Bonjour, ça va? Très bien, merci. Grüße aus Köln.",
]

TEXT_FAMILIES = ("llama", "qwen2", "qwen3", "phi3")
VISION_KINDS = ("clip", "siglip", "open_clip")

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def tiny_text_config(family: str = "qwen2", vocab_size: int = 96, **overrides: Any) -> dict[str, Any]:
    """A 4-layer, 32-wide causal LM config of the given family."""
    if family not in TEXT_FAMILIES:
        raise ValueError(f"family must be one of {TEXT_FAMILIES}, got {family!r}")
    cfg: dict[str, Any] = {
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if family == "qwen3":
        cfg["head_dim"] = 8
    cfg.update(overrides)
    return cfg


def tiny_vision_config(kind: str = "clip", **overrides: Any) -> dict[str, Any]:
    """A 3-block, 32-wide tower over 32 px images in 8 px patches (16 patches)."""
    if kind not in VISION_KINDS:
        raise ValueError(f"kind must be one of {VISION_KINDS}, got {kind!r}")
    if kind == "open_clip":
        cfg: dict[str, Any] = {
            "backend": "open_clip",
            "name_or_path": "llava-smoe-tiny-vit",
            "open_clip_model_config": TINY_OPEN_CLIP,
        }
    else:
        cfg = {
            "backend": "hf",
            "hf_config": {
                "model_type": f"{kind}_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
            },
        }
    cfg.update(overrides)
    return cfg


def tiny_model_config(vision: str = "clip", family: str = "qwen2", vocab_size: int = 96,
                      image_token_id: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A `VLMConfig` dict; the image token is the last vocabulary id unless given."""
    cfg: dict[str, Any] = {
        "vision": tiny_vision_config(vision),
        "projector": {"type": "mlp2x_gelu"},
        "language_model": {"config": tiny_text_config(family, vocab_size)},
        "image_token_id": vocab_size - 1 if image_token_id is None else image_token_id,
    }
    cfg.update(overrides)
    return cfg


def tiny_processor(template: str = "chatml", image_mode: str = "pad", *, with_template_text: bool = True):
    """A processor over a BPE trained on CORPUS, for 32 px images of 16 tokens. Without template
    text the BPE splits role words ("assistant") into pieces, as third-party tokenizers may."""
    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
        train_bpe_tokenizer,
    )

    tokenizer = train_bpe_tokenizer(CORPUS * 20, vocab_size=400, min_frequency=1,
                                    with_template_text=with_template_text)
    return LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template=template, num_image_tokens=16, image=ImageProcessingConfig(image_size=32, mode=image_mode)))


def save_tiny_checkpoint(out_dir: str, *, router: str = "smoe", num_experts: int = 4, template: str = "chatml",
                         max_position_embeddings: int = 512, seed: int = 0) -> str:
    """Write a 4-layer MoE VLM (every other layer MoE) over 32 px images (16 tokens each) with a
    locally trained tokenizer; `load_pretrained` and the CLI load it like any checkpoint."""
    import torch

    from llava_smoe.model import build_model
    from llava_smoe.pretrained import save_pretrained

    processor = tiny_processor(template)
    tokenizer = processor.tokenizer
    vocab = len(tokenizer)
    config = tiny_model_config(vocab_size=vocab, image_token_id=processor.image_token_id,
                               moe={"num_experts": num_experts, "top_k": 2, "router": router})
    config["language_model"] = {"config": tiny_text_config(
        "qwen2", vocab, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )}
    torch.manual_seed(seed)
    save_pretrained(build_model(config), processor, out_dir)
    return out_dir
