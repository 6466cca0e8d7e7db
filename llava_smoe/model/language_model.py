"""The language model: any transformers causal LM whose decoder layers have an `mlp` FFN.

Tested families: Llama, Qwen2 / Qwen2.5, Qwen3, Phi-3 / Phi-3.5. An LM with MoE layers is the
family's model whose chosen layers' `mlp` is a `llava_smoe.moe.MoELayer`; its config records
them (`llava_smoe_moe`, see `surgery`), so building from that config rebuilds them. Saved as a
transformers folder (`config.json`, `model.safetensors`, the tokenizer), it loads with
`load_language_model` here and as the language model of a VLM recipe
(`language_model: {name_or_path: FOLDER}`); parameter names are those the VLM's surgery makes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llava_smoe.config import Config, ConfigError, invalid
from llava_smoe.moe import MoEConfig, MoELayer
from llava_smoe.moe.config import LayerSpec, MoELayers, resolve_layers

from .surgery import check_language_model, decoder_layers, install_lm_moe, lm_moe

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

WEIGHTS_FILE = "model.safetensors"


def build_language_model(config: PreTrainedConfig | dict[str, Any], *, attn_implementation: str | None = None,
                         dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from a transformers config (or a dict with `model_type`),
    with the MoE layers its config records."""
    from transformers import AutoModelForCausalLM

    config = text_config_from_dict(config) if isinstance(config, dict) else config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    check_language_model(lm)
    moe = lm_moe(config)
    if moe is not None:
        install_lm_moe(lm, moe)
    return lm


def load_language_model(path: str, *, attn_implementation: str | None = None,
                        dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A pretrained causal LM from a local folder or hub id (safetensors only, no remote code),
    dense or with the MoE layers its config records."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if lm_moe(config) is not None:
        # transformers does not know our MoE layers: build them from the config, then load strictly.
        lm = build_language_model(config, attn_implementation=attn_implementation)
        _load_safetensors_strict(lm, path)
        return lm.to(dtype) if dtype is not None else lm
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                              trust_remote_code=False, **kwargs)
    check_language_model(lm)
    return lm


def save_language_model(lm: PreTrainedModel, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write config.json (with its MoE record), model.safetensors and the tokenizer."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.config.save_pretrained(out)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(out)
    # Tied tensors are written once; loading restores the tie. "pt" lets transformers read it.
    save_model(lm, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _load_safetensors_strict(lm: nn.Module, path: str) -> None:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors are loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    # Tied tensors (e.g. embeddings shared with lm_head) are stored once under either name.
    aliases: dict[int, set[str]] = {}
    for name, p in lm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    for names in aliases.values():
        present = names & state.keys()
        for name in names - present if present else ():
            state[name] = state[next(iter(present))]
    result = lm.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not match the MoE language model described by its config: "
                         f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")


def text_config_from_dict(d: dict[str, Any]) -> PreTrainedConfig:
    from transformers import AutoConfig

    if "model_type" not in d:
        raise ValueError("language model config dict needs 'model_type' (e.g. 'qwen2', 'llama', 'phi3')")
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@dataclass
class LMModelConfig(Config):
    """The architecture of a language model trained from scratch.

    architecture: a transformers config dict with `model_type` (e.g. qwen3, llama); vocab_size,
        special token ids and max_position_embeddings are filled in from the tokenizer and the
        sequence length unless given.
    moe: the MoE layers' config, or None for a dense model.
    moe_layers: "all", "every_other" (odd layers), "none", or a list of layer indices.
    """

    architecture: dict[str, Any] = field(default_factory=lambda: {"model_type": "qwen3"})
    moe: MoEConfig | None = None
    moe_layers: LayerSpec = "all"

    def validate(self) -> None:
        if "model_type" not in self.architecture:
            raise invalid("architecture", "needs 'model_type' (e.g. qwen3 or llama)")

    def build(self, *, vocab_size: int, max_seq_len: int, bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None) -> PreTrainedModel:
        """A randomly initialised causal LM, MoE in the layers `moe_layers` names."""
        arch = dict(self.architecture)
        arch.setdefault("vocab_size", vocab_size)
        if arch["vocab_size"] < vocab_size:
            raise invalid("architecture", f"vocab_size={arch['vocab_size']} is smaller than the tokenizer's "
                                          f"{vocab_size} tokens; drop the key to use the tokenizer's size")
        arch.setdefault("max_position_embeddings", max_seq_len)
        if arch["max_position_embeddings"] < max_seq_len:
            raise invalid("architecture", f"max_position_embeddings={arch['max_position_embeddings']} "
                                          f"is below the sequence length {max_seq_len}")
        for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                           ("pad_token_id", pad_token_id)):
            arch.setdefault(key, value)
        lm = build_language_model(arch)
        if self.moe is not None:
            try:
                layers = resolve_layers(self.moe_layers, len(decoder_layers(lm)))
            except ConfigError as exc:
                raise exc.within("moe_layers") from None
            install_lm_moe(lm, MoELayers(moe_config=self.moe, layers=layers))
        return lm


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
    moe = lm_moe(lm.config)
    shape = "dense" if moe is None else json.dumps({"router": moe.moe_config.router, "experts": moe.moe_config.num_experts,
                                                     "top_k": moe.moe_config.top_k, "layers": moe.layers})
    return f"{lm.config.model_type}: {counts['total']:,} parameters ({counts['active']:,} active per token), {shape}"
