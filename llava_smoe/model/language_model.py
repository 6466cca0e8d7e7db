"""The language model: any transformers causal LM whose decoder layers have an `mlp` FFN.

Tested families: Llama, Qwen2 / Qwen2.5, Qwen3, Phi-3 / Phi-3.5. MoE surgery replaces chosen
layers' `mlp` by `llava_smoe.moe.upcycle_ffn(layer.mlp, ...)`; the same placement rules serve
the vision tower's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

    from llava_smoe.moe import MoEConfig

LayerSpec = Literal["none", "all", "every_other"] | Sequence[int]


def build_language_model(config: PreTrainedConfig | dict[str, Any], *, attn_implementation: str | None = None,
                         dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from a transformers config (or a dict with `model_type`)."""
    from transformers import AutoModelForCausalLM

    config = text_config_from_dict(config) if isinstance(config, dict) else config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    check_language_model(lm)
    return lm


def load_language_model(path: str, *, attn_implementation: str | None = None,
                        dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A pretrained causal LM from a local folder or hub id (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                              trust_remote_code=False, **kwargs)
    check_language_model(lm)
    return lm


def text_config_from_dict(d: dict[str, Any]) -> PreTrainedConfig:
    from transformers import AutoConfig

    if "model_type" not in d:
        raise ValueError("language model config dict needs 'model_type' (e.g. 'qwen2', 'llama', 'phi3')")
    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`lm.model.layers` for Llama/Qwen/Phi-3)."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(lm).__name__}: cannot find the decoder layers (expected a ModuleList at "
            "`model.layers`, as in Llama/Qwen/Phi-3 models)"
        )
    return layers


def check_language_model(lm: nn.Module) -> None:
    for i, layer in enumerate(decoder_layers(lm)):
        if not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise ValueError(
                f"{type(lm).__name__} layer {i} has no `mlp` FFN module; supported families have one "
                "per decoder layer (Llama, Qwen2/2.5/3, Phi-3)"
            )


def resolve_layers(spec: LayerSpec, num_layers: int, *, where: str) -> list[int]:
    """"all" | "every_other" (odd layers 1, 3, 5, ... as MoE-LLaVA) | "none" | explicit indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "every_other":
            return list(range(1, num_layers, 2))
        if spec == "none":
            return []
        raise ValueError(f"{where}: placement {spec!r} is not 'all', 'every_other', 'none' or a list of layers")
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{where}: layer indices {bad} are out of range for {num_layers} layers (0..{num_layers - 1})")
    return layers


def upcycle_blocks(blocks: Sequence[nn.Module], layer_ids: Sequence[int], moe_config: MoEConfig,
                   *, where: str) -> None:
    """Replace `blocks[i].mlp` by an upcycled MoELayer for every i in layer_ids."""
    from llava_smoe.moe import MoELayer, upcycle_ffn

    for i in layer_ids:
        mlp = blocks[i].mlp
        if isinstance(mlp, MoELayer):
            raise ValueError(f"{where} layer {i} is already an MoE layer: MoE surgery must be applied once")
        try:
            blocks[i].mlp = upcycle_ffn(mlp, moe_config, layer_idx=i)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} layer {i}: cannot upcycle {type(mlp).__name__}: {err}") from err
