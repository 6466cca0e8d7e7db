"""A decoder-only language model from a transformers config, with MoE FFNs where asked.

The model is a plain transformers causal LM (Llama, Qwen3, ...) whose chosen layers' `mlp` is
a `llava_smoe.moe.MoELayer` with experts the size of the config's `intermediate_size`. Saved as
a transformers folder: `config.json` (the family's config plus a `llava_smoe_moe` entry naming
the MoE config and layers), `model.safetensors`, and the tokenizer. `load_lm` rebuilds the MoE
layers before loading the weights; the parameter names are exactly those the VLM's LM surgery
produces, so the weights load into a VLM built with the same MoE config and placement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llava_smoe.model.language_model import (
    LayerSpec,
    build_language_model,
    decoder_layers,
    install_moe_layers,
    lm_moe_spec,
    load_language_model,
    resolve_layers,
)
from llava_smoe.moe import MoEConfig, MoELayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHTS_FILE = "model.safetensors"


@dataclass
class LMModelConfig:
    """The architecture of a language model trained from scratch.

    architecture: a transformers config dict with `model_type` (e.g. qwen3, llama); vocab_size,
        special token ids and max_position_embeddings are filled in from the tokenizer and the
        sequence length unless given.
    moe: MoEConfig fields, or None for a dense model.
    moe_layers: "all", "every_other" (odd layers), "none", or a list of layer indices.
    """

    architecture: dict[str, Any] = field(default_factory=lambda: {"model_type": "qwen3"})
    moe: dict[str, Any] | None = None
    moe_layers: LayerSpec = "all"

    def __post_init__(self) -> None:
        if "model_type" not in self.architecture:
            raise ValueError("architecture needs 'model_type' (e.g. qwen3 or llama)")
        if self.moe is not None:
            try:
                MoEConfig.from_dict(self.moe)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"moe: {exc}") from None
        if isinstance(self.moe_layers, str) and self.moe_layers not in ("all", "every_other", "none"):
            raise ValueError(f"moe_layers={self.moe_layers!r}: use 'all', 'every_other', 'none' or a list of layers")

    def moe_config(self) -> MoEConfig | None:
        return None if self.moe is None else MoEConfig.from_dict(self.moe)


def build_lm(config: LMModelConfig, *, vocab_size: int, max_seq_len: int, bos_token_id: int | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM, MoE in the layers `config.moe_layers` names."""
    arch = dict(config.architecture)
    arch.setdefault("vocab_size", vocab_size)
    if arch["vocab_size"] < vocab_size:
        raise ValueError(f"architecture.vocab_size={arch['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; drop the key to use the tokenizer's size")
    arch.setdefault("max_position_embeddings", max_seq_len)
    if arch["max_position_embeddings"] < max_seq_len:
        raise ValueError(f"architecture.max_position_embeddings={arch['max_position_embeddings']} "
                         f"is below the sequence length {max_seq_len}")
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        arch.setdefault(key, value)
    lm = build_language_model(arch)
    moe = config.moe_config()
    if moe is not None:
        layers = resolve_layers(config.moe_layers, len(decoder_layers(lm)), where="moe_layers")
        install_moe_layers(lm, moe, layers)
    return lm


def save_lm(lm: PreTrainedModel, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json (with the MoE entry), model.safetensors and the tokenizer."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.config.save_pretrained(out)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(out)
    # Tied tensors are written once; load_model restores the tie. "pt" lets transformers read it.
    save_model(lm, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_lm(path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a folder written by `save_lm` (dense or MoE)."""
    if not (Path(path) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}; expected a folder written by save_lm")
    lm = load_language_model(str(path), attn_implementation=attn_implementation, dtype=dtype)
    return lm.to(device) if device is not None else lm


def parameter_counts(lm: nn.Module) -> dict[str, int]:
    """Total parameters and those a token uses (routed experts counted top_k / E)."""
    total = sum(p.numel() for p in lm.parameters())
    inactive = 0
    for module in lm.modules():
        if isinstance(module, MoELayer):
            c = module.config
            expert = sum(p.numel() for p in module.experts.parameters())
            inactive += expert - expert * min(c.top_k, c.num_experts) // c.num_experts
    return {"total": total, "active": total - inactive}


def describe(lm: nn.Module) -> str:
    counts = parameter_counts(lm)
    spec = lm_moe_spec(lm.config)
    moe = "dense" if spec is None else json.dumps({"router": spec[0].router, "experts": spec[0].num_experts,
                                                    "top_k": spec[0].top_k, "layers": spec[1]})
    return f"{lm.config.model_type}: {counts['total']:,} parameters ({counts['active']:,} active per token), {moe}"
