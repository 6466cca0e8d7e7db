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

# An LM trained with MoE layers (llava_smoe.lm) records them in its config.json under this key:
# {"moe_config": {...}, "layers": [...]}; building from such a config re-creates the MoE layers.
MOE_CONFIG_KEY = "llava_smoe_moe"


def build_language_model(config: PreTrainedConfig | dict[str, Any], *, attn_implementation: str | None = None,
                         dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from a transformers config (or a dict with `model_type`)."""
    from transformers import AutoModelForCausalLM

    config = text_config_from_dict(config) if isinstance(config, dict) else config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    check_language_model(lm)
    spec = lm_moe_spec(config)
    if spec is not None:
        install_moe_layers(lm, *spec)
    return lm


def load_language_model(path: str, *, attn_implementation: str | None = None,
                        dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A pretrained causal LM from a local folder or hub id (safetensors only, no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if lm_moe_spec(config) is not None:
        # transformers does not know our MoE layers: build them from the config, then load strictly.
        lm = build_language_model(config, attn_implementation=attn_implementation)
        _load_safetensors_strict(lm, path)
        return lm.to(dtype) if dtype is not None else lm
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                              trust_remote_code=False, **kwargs)
    check_language_model(lm)
    return lm


def _load_safetensors_strict(lm: nn.Module, path: str) -> None:
    from pathlib import Path

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


def install_moe_layers(lm: nn.Module, moe: MoEConfig, layers: Sequence[int]) -> None:
    """Replace `mlp` of `layers` by freshly initialised MoE layers and record it in `lm.config`.

    Experts start like the dense FFNs they replace (normal, std `initializer_range`), so dense
    and MoE runs of one architecture start from the same weight scale.
    """
    from llava_smoe.moe import MoELayer

    blocks = decoder_layers(lm)
    cfg = lm.config
    std = getattr(cfg, "initializer_range", 0.02)
    for i in layers:
        if isinstance(blocks[i].mlp, MoELayer):
            raise ValueError(f"language model layer {i} is already an MoE layer")
        ref = next(blocks[i].mlp.parameters())
        layer = MoELayer(moe, cfg.hidden_size, cfg.intermediate_size, ffn_kind="swiglu",
                         activation=cfg.hidden_act, layer_idx=i).to(device=ref.device, dtype=ref.dtype)
        for experts in (layer.experts, layer.shared_experts):
            if experts is not None:
                for p in experts.parameters():
                    nn.init.normal_(p, std=std)
        blocks[i].mlp = layer
    setattr(cfg, MOE_CONFIG_KEY, {"moe_config": moe.to_dict(), "layers": list(layers)})


def lm_moe_spec(config: Any) -> tuple[MoEConfig, list[int]] | None:
    """(MoE config, MoE layer indices) recorded in an LM config (object or dict), or None if dense."""
    entry = config.get(MOE_CONFIG_KEY) if isinstance(config, dict) else getattr(config, MOE_CONFIG_KEY, None)
    if not entry:
        return None
    from llava_smoe.moe import MoEConfig

    return MoEConfig.from_dict(entry["moe_config"]), [int(i) for i in entry["layers"]]
