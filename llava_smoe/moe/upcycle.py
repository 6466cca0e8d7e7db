"""Sparse upcycling: build an MoE layer whose experts start as copies of a trained dense FFN.

With identical experts and gate weights that sum to 1 (softmax top-k, CompeteSMoE's router
policy, cosine and sigmoid routers), the MoE output at initialisation equals the dense output.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .experts import _ACTIVATIONS
from .layer import MoELayer


def _activation_name(act) -> str:
    """Identify an activation module/function by its values (class names differ across libraries)."""
    # On the CPU whatever the default device: a model built on the meta device (planning) has no values.
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        got = act(probe)
        for name, fn in _ACTIVATIONS.items():
            if torch.allclose(got, fn(probe), atol=1e-6):
                return name
    raise ValueError(f"cannot upcycle an FFN with activation {act!r}: it matches none of {sorted(_ACTIVATIONS)}")


def _linear(module: nn.Module, name: str) -> nn.Linear:
    lin = getattr(module, name)
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"expected {type(module).__name__}.{name} to be nn.Linear, got {type(lin).__name__}")
    return lin


def _dense_weights(ffn: nn.Module) -> dict:
    """Read a dense FFN into (kind, activation, x@W-oriented weights)."""
    names = {n for n, _ in ffn.named_children()}
    if {"gate_proj", "up_proj", "down_proj"} <= names:  # Llama, Qwen2/3, Mistral ...
        gate, up, down = (_linear(ffn, n) for n in ("gate_proj", "up_proj", "down_proj"))
        if any(l.bias is not None for l in (gate, up, down)):
            raise ValueError("cannot upcycle a SwiGLU FFN with biases (mlp_bias=True): experts are bias-free")
        act = getattr(ffn, "act_fn", None) or getattr(ffn, "activation_fn")
        w_in = torch.cat([gate.weight.t(), up.weight.t()], dim=1)
        return dict(kind="swiglu", act=act, w_in=w_in, w_out=down.weight.t(), b_in=None, b_out=None)
    if {"gate_up_proj", "down_proj"} <= names:  # Phi-3: fused [gate; up]
        gate_up, down = _linear(ffn, "gate_up_proj"), _linear(ffn, "down_proj")
        if gate_up.bias is not None or down.bias is not None:
            raise ValueError("cannot upcycle a SwiGLU FFN with biases: experts are bias-free")
        act = getattr(ffn, "activation_fn", None) or getattr(ffn, "act_fn")
        return dict(kind="swiglu", act=act, w_in=gate_up.weight.t(), w_out=down.weight.t(), b_in=None, b_out=None)
    for fc1_name, fc2_name, act_names in (("fc1", "fc2", ("activation_fn", "act")), ("c_fc", "c_proj", ("gelu", "act"))):
        if {fc1_name, fc2_name} <= names:  # CLIP / SigLIP (fc1, fc2); open_clip (c_fc, c_proj)
            fc1, fc2 = _linear(ffn, fc1_name), _linear(ffn, fc2_name)
            act = next((getattr(ffn, n) for n in act_names if hasattr(ffn, n)), None)
            if act is None:
                raise ValueError(f"cannot find the activation of {type(ffn).__name__} (looked for {act_names})")
            return dict(
                kind="gelu", act=act, w_in=fc1.weight.t(), w_out=fc2.weight.t(),
                b_in=fc1.bias, b_out=fc2.bias,
            )
    raise ValueError(
        f"cannot upcycle {type(ffn).__name__} with children {sorted(names)}: expected gate_proj/up_proj/down_proj, "
        "gate_up_proj/down_proj, fc1/fc2 or c_fc/c_proj"
    )


@torch.no_grad()
def upcycle_ffn(
    dense_ffn: nn.Module, config: MoEConfig, layer_idx: int = 0, generator: torch.Generator | None = None
) -> MoELayer:
    """An MoE layer whose routed (and shared) experts are copies of `dense_ffn`; a fresh router."""
    if isinstance(dense_ffn, MoELayer):
        raise ValueError(f"layer {layer_idx} is already an MoE layer; upcycling applies to dense FFNs only")
    w = _dense_weights(dense_ffn)
    has_bias = w["b_in"] is not None or w["b_out"] is not None
    D, F_in = w["w_in"].shape
    ffn_size = F_in // 2 if w["kind"] == "swiglu" else F_in
    ref = w["w_in"]
    layer = MoELayer(
        config, hidden_size=D, ffn_size=ffn_size, ffn_kind=w["kind"], activation=_activation_name(w["act"]),
        bias=has_bias, layer_idx=layer_idx,
    ).to(device=ref.device, dtype=ref.dtype)

    def fill(experts, noise: float) -> None:
        targets = {"w_gate_up_EDF2": w["w_in"], "w_fc1_EDF": w["w_in"], "w_down_EFD": w["w_out"], "w_fc2_EFD": w["w_out"]}
        if has_bias:
            targets["b_fc1_EF"] = w["b_in"] if w["b_in"] is not None else torch.zeros(ffn_size)
            targets["b_fc2_ED"] = w["b_out"] if w["b_out"] is not None else torch.zeros(D)
        for name, p in experts.named_parameters():
            src = targets[name].to(p.dtype)
            p.copy_(src.unsqueeze(0).expand_as(p))
            if noise > 0 and name.startswith("w_"):
                eps = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
                p.add_(noise * src.float().std().to(p.dtype) * eps)

    fill(layer.experts, config.upcycle_noise)
    if layer.shared_experts is not None:
        fill(layer.shared_experts, 0.0)
    return layer
