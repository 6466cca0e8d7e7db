"""MoE surgery: where a model's FFNs are, turning them into MoE layers, and recording it.

Every change to a model's MoE layers goes through here, and each one updates the record of the
component it changed (`MoELayers`, see `llava_smoe.moe.config`): a language model's config
under `llava_smoe_moe`, a vision tower's config under `moe`, the "moe" projector's config. So a
saved config always rebuilds the layers it was saved with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llava_smoe.config import ConfigError, dump, parse
from llava_smoe.moe import MoEConfig, MoELayer, upcycle_ffn
from llava_smoe.moe.config import LayerSpec, MoELayers, resolve_layers

if TYPE_CHECKING:
    from .modeling import LlavaSmoeForConditionalGeneration

# The key under which a language model's config records its MoE layers.
LM_MOE_KEY = "llava_smoe_moe"


# -- where the FFNs are -----------------------------------------------------------------------------
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


# -- the records --------------------------------------------------------------------------------------
def lm_moe(config: Any) -> MoELayers | None:
    """The MoE layers a language model's config (object or dict) records, or None if dense."""
    entry = config.get(LM_MOE_KEY) if isinstance(config, dict) else getattr(config, LM_MOE_KEY, None)
    return None if not entry else parse(MoELayers, entry, (LM_MOE_KEY,))


def moe_of(blocks: Sequence[nn.Module]) -> MoELayers | None:
    """The record of the MoE layers found in `blocks` (their `mlp`), from the modules themselves."""
    found = [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), MoELayer)]
    if not found:
        return None
    configs = {repr(layer.config) for _, layer in found}
    if len(configs) > 1:
        raise ValueError(f"MoE layers {[i for i, _ in found]} have different configs; one record holds one")
    return MoELayers(moe_config=found[0][1].config, layers=[i for i, _ in found])


def record_lm_moe(lm: nn.Module) -> None:
    """Write the language model's MoE layers into its config (or remove a stale record)."""
    moe = moe_of(decoder_layers(lm))
    if moe is None:
        if hasattr(lm.config, LM_MOE_KEY):
            delattr(lm.config, LM_MOE_KEY)
        return
    setattr(lm.config, LM_MOE_KEY, dump(moe))


def record_moe(model: LlavaSmoeForConditionalGeneration) -> None:
    """Write every component's MoE layers into the VLM's config, from the modules themselves."""
    from .projector import MoEProjector

    record_lm_moe(model.language_model)
    tower = moe_of(model.vision_tower.blocks())
    model.config.vision_config = {**model.config.vision_config, "moe": None if tower is None else dump(tower)}
    projector = model.projector.base if hasattr(model.projector, "base") else model.projector
    if isinstance(projector, MoEProjector):
        model.config.projector_config = {**model.config.projector_config, "type": "moe",
                                         "moe_config": dump(projector.moe.config)}
    model.refresh_moe_layers()


# -- building MoE layers ----------------------------------------------------------------------------
def upcycle_layers(blocks: Sequence[nn.Module], layer_ids: Sequence[int], moe_config: MoEConfig,
                   *, where: str) -> None:
    """Replace `blocks[i].mlp` by an MoE layer whose experts copy it, for every i in layer_ids."""
    for i in layer_ids:
        mlp = blocks[i].mlp
        if isinstance(mlp, MoELayer):
            raise ValueError(f"{where} layer {i} is already an MoE layer: MoE surgery must be applied once")
        try:
            blocks[i].mlp = upcycle_ffn(mlp, moe_config, layer_idx=i)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} layer {i}: cannot upcycle {type(mlp).__name__}: {err}") from err


def install_lm_moe(lm: nn.Module, moe: MoELayers) -> None:
    """Fresh MoE layers in a language model, as its record says (building from a config).

    Experts start like the dense FFNs they replace (normal, std `initializer_range`), so dense
    and MoE runs of one architecture start from the same weight scale.
    """
    blocks = decoder_layers(lm)
    cfg = lm.config
    std = getattr(cfg, "initializer_range", 0.02)
    try:
        layers = resolve_layers(moe.layers, len(blocks))
    except ConfigError as exc:
        raise exc.within(LM_MOE_KEY, "layers") from None
    for i in layers:
        if isinstance(blocks[i].mlp, MoELayer):
            raise ValueError(f"language model layer {i} is already an MoE layer")
        ref = next(blocks[i].mlp.parameters())
        layer = MoELayer(moe.moe_config, cfg.hidden_size, cfg.intermediate_size, ffn_kind="swiglu",
                         activation=cfg.hidden_act, layer_idx=i).to(device=ref.device, dtype=ref.dtype)
        for experts in (layer.experts, layer.shared_experts):
            if experts is not None:
                for p in experts.parameters():
                    nn.init.normal_(p, std=std)
        blocks[i].mlp = layer
    record_lm_moe(lm)


def tower_layers(tower: nn.Module, spec: LayerSpec, *, where: str) -> list[int]:
    """A placement in a vision tower: "all" / "every_other" count only the blocks up to the
    feature layer (later ones never reach the features); listing a later block is an error."""
    blocks = tower.blocks()
    used = tower.feature_block + 1
    try:
        ids = resolve_layers(spec, used if isinstance(spec, str) else len(blocks))
    except ConfigError as exc:
        raise ConfigError(exc.reason, (where,)) from None
    unused = [i for i in ids if i >= used]
    if unused:
        raise ConfigError(f"blocks {unused} come after the feature layer (block {tower.feature_block}) and "
                          "never affect the output; drop them", (where,))
    return ids


def upcycle(model: LlavaSmoeForConditionalGeneration, moe_config: MoEConfig, language_model: LayerSpec = "every_other",
            vision_tower: LayerSpec = "none", projector: bool = False) -> None:
    """Upcycle a VLM's dense FFNs into MoE layers (experts start as copies) and record it.

    projector: also turn an mlp3x_gelu projector into the "moe" projector.
    """
    from .projector import upcycle_projector

    lm_blocks = decoder_layers(model.language_model)
    if any(isinstance(b.mlp, MoELayer) for b in lm_blocks) and language_model != "none":
        raise ValueError("the language model already has MoE layers: surgery applies once "
                         "(set moe_placement.language_model to 'none' to upcycle only the vision tower)")
    try:
        lm_ids = resolve_layers(language_model, len(lm_blocks))
    except ConfigError as exc:
        raise ConfigError(exc.reason, ("moe_placement", "language_model")) from None
    tower_ids = tower_layers(model.vision_tower, vision_tower, where="moe_placement.vision_tower")
    upcycle_layers(lm_blocks, lm_ids, moe_config, where="language model")
    upcycle_layers(model.vision_tower.blocks(), tower_ids, moe_config, where="vision tower")
    if projector:
        model.projector = upcycle_projector(model.projector, moe_config)
    record_moe(model)


def widen_lm_ffns(model: LlavaSmoeForConditionalGeneration, factor: int) -> None:
    """Widen every dense FFN of the language model from F to factor x F units, keeping its function.

    The trained units stay; the new ones get fresh gate/up rows (normal, std `initializer_range`,
    as a new FFN starts) and zero down-projection columns, so the widened model computes what the
    checkpoint did and the new units break symmetry from their first gradient (copies of the
    trained units would get identical updates forever). The LM's config records the new width, so
    the saved checkpoint rebuilds it. This is the dense model with an upcycled MoE's active width
    (k x F), started from the same checkpoint as the MoE.
    """
    lm = model.language_model
    blocks = decoder_layers(lm)
    if any(isinstance(b.mlp, MoELayer) for b in blocks):
        raise ValueError("widen_ffn widens dense FFNs; this language model has MoE layers")
    if factor < 2:
        raise ValueError(f"widen_ffn must be at least 2 (got {factor})")
    std = getattr(lm.config, "initializer_range", 0.02)
    width = lm.config.intermediate_size
    for i, block in enumerate(blocks):
        mlp = block.mlp
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"language model layer {i}: widen_ffn needs a gate_proj/up_proj/down_proj FFN "
                             f"(Llama, Qwen); got {type(mlp).__name__}")
        with torch.no_grad():
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = _linear_like(old, old.in_features, factor * width)
                new.weight[:width] = old.weight
                nn.init.normal_(new.weight[width:], std=std)
                if old.bias is not None:
                    new.bias[:width] = old.bias
                    new.bias[width:] = 0
                setattr(mlp, name, new)
            old = mlp.down_proj
            new = _linear_like(old, factor * width, old.out_features)
            new.weight[:, :width] = old.weight
            new.weight[:, width:] = 0
            if old.bias is not None:
                new.bias.copy_(old.bias)
            mlp.down_proj = new
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = factor * width
    lm.config.intermediate_size = factor * width


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def install_from_config(model: LlavaSmoeForConditionalGeneration, tower_moe: MoELayers | None) -> None:
    """The vision tower's MoE layers a VLM config records (the language model's and the
    projector's are built with those parts); weights are loaded afterwards."""
    blocks = model.vision_tower.blocks()
    if tower_moe is not None and not any(isinstance(getattr(b, "mlp", None), MoELayer) for b in blocks):
        ids = tower_layers(model.vision_tower, tower_moe.layers, where="vision_config.moe.layers")
        upcycle_layers(model.vision_tower.blocks(), ids, tower_moe.moe_config, where="vision tower")
