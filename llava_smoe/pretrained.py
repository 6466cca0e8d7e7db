"""A checkpoint folder: the model (`config.json` + `model.safetensors`) and its processor
(tokenizer + `processor_config.json`), loaded together and checked against each other once.

Training (`init_from`), evaluation, routing analysis, serving and the quickstart all load
through `load_pretrained`, so none of them can pair a model with another checkpoint's processor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

    from llava_smoe.model.modeling import LlavaSmoeForConditionalGeneration
    from llava_smoe.processing import LlavaSmoeProcessor

# Names of the dtypes a checkpoint may run in (importable without torch, for argument parsers).
DTypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DTypeChoice)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None / "auto": CUDA when available, else the CPU."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None / "auto": bfloat16 on a GPU that has it, else float32."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[LlavaSmoeForConditionalGeneration, LlavaSmoeProcessor]:
    """(model in eval mode, processor) from a checkpoint folder (safetensors only; nothing is
    inferred from the folder's name). Checkpoints of an older format are converted on load."""
    from llava_smoe.model.modeling import (
        LlavaSmoeForConditionalGeneration,
        resolve_attn_implementation,
    )
    from llava_smoe.processing import LlavaSmoeProcessor

    path = str(path)
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a checkpoint folder written by save_pretrained)")
    device = resolve_device(device)
    attn = resolve_attn_implementation(attn_implementation, device)
    processor = LlavaSmoeProcessor.from_pretrained(path)
    model = LlavaSmoeForConditionalGeneration.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), use_safetensors=True, attn_implementation=attn)
    check_pair(model, processor, where=path)
    return model.to(device).eval(), processor


def save_pretrained(model: LlavaSmoeForConditionalGeneration, processor: LlavaSmoeProcessor,
                    out_dir: str | os.PathLike) -> Path:
    """Write the model and its processor into one folder, after checking they belong together."""
    check_pair(model, processor, where=str(out_dir))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def check_pair(model: LlavaSmoeForConditionalGeneration, processor: LlavaSmoeProcessor, *, where: str) -> None:
    """The processor builds what the model reads: same image token, tokens and size per image,
    and a vocabulary the embedding table covers."""
    problems = []
    if processor.image_token_id != model.config.image_token_id:
        problems.append(f"image token id {processor.image_token_id} (processor) vs {model.config.image_token_id} (model)")
    if processor.num_image_tokens != model.num_image_tokens:
        problems.append(f"tokens per image {processor.num_image_tokens} (processor) vs {model.num_image_tokens} "
                        "(vision tower)")
    if processor.image_config.image_size != model.vision_tower.image_size:
        problems.append(f"image size {processor.image_config.image_size} (processor) vs "
                        f"{model.vision_tower.image_size} (vision tower)")
    if len(processor.tokenizer) > model.config.text_config.vocab_size:
        problems.append(f"tokenizer has {len(processor.tokenizer)} tokens, model vocabulary "
                        f"{model.config.text_config.vocab_size}")
    if problems:
        raise ValueError(f"{where}: processor and model disagree: " + "; ".join(problems))
