"""A tiny random-weight checkpoint (model + processor) for smoke runs of the front ends on CPU."""

from __future__ import annotations

import os

CORPUS = [
    "What shape is in the image? A red circle on the left.",
    "How many squares are there? There are two blue squares.",
    "Describe the picture. A green triangle above a yellow star.",
    "Is the circle bigger than the square? Yes, the circle is bigger.",
    "Bonjour, ça va? Très bien, merci. Grüße aus Köln.",
]


def save_tiny_checkpoint(out_dir: str, *, router: str = "smoe", num_experts: int = 4, template: str = "chatml",
                         max_position_embeddings: int = 512, seed: int = 0) -> str:
    """Write a 4-layer MoE VLM (every other layer MoE) over 32 px images (16 tokens each) with a
    locally trained tokenizer; `Engine` and the CLI load it like any checkpoint."""
    import torch

    from llava_smoe.model import build_model, tiny_model_config, tiny_text_config
    from llava_smoe.processing import ImageProcessingConfig, LlavaSmoeProcessor, ProcessorConfig, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(CORPUS * 20, vocab_size=400, min_frequency=1)
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template=template, num_image_tokens=16, image=ImageProcessingConfig(image_size=32),
    ))
    vocab = len(tokenizer)
    config = tiny_model_config(vocab_size=vocab, image_token_id=processor.image_token_id,
                               moe={"num_experts": num_experts, "top_k": 2, "router": router})
    config["language_model"] = {"config": tiny_text_config(
        "qwen2", vocab, max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )}
    torch.manual_seed(seed)
    model = build_model(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
