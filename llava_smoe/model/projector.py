"""Projectors: map vision features [..., C_vision] to language-model embeddings [..., D].

Types:
- "identity": no parameters (C_vision must equal D).
- "linear": one Linear.
- "mlp{N}x_gelu": Linear(C, D), then (GELU, Linear(D, D)) x (N-1); LLaVA-1.5 uses mlp2x_gelu.
- "moe": Linear(C, D), GELU, then an MoELayer(D, D, ffn_kind="gelu") whose experts are
  Linear(D, D) -> GELU -> Linear(D, D), configured by `moe_config`. It is mlp3x_gelu with its
  last two Linears turned into experts, so `upcycle_projector` converts a trained mlp3x_gelu
  projector into it with identical outputs. (An MoELayer maps D -> D, so the C -> D input
  Linear stays dense.)

`position_embedding: true` adds a learned vector per image-token position to the projector's
output (`PositionedProjector`): the tokens then carry their place in the image in their values,
which a language model reads by content, where RoPE alone only shapes attention scores. A
tower's own position embeddings enter at its input and fade under content in deep features.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from llava_smoe.config import Config, invalid, parse
from llava_smoe.moe.config import MoEConfig

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class ProjectorConfig(Config):
    """type: 'identity', 'linear', 'mlp{N}x_gelu' or 'moe'; moe_config: the experts of 'moe'."""

    type: str = "mlp2x_gelu"
    bias: bool = True
    position_embedding: bool = False
    moe_config: MoEConfig | None = None

    def validate(self) -> None:
        m = _MLP_RE.match(self.type)
        if self.type not in ("identity", "linear", "moe") and not (m and int(m.group(1)) >= 1):
            raise invalid("type", f"{self.type!r} is not one of 'identity', 'linear', 'mlp{{N}}x_gelu' "
                                  "(N >= 1, e.g. 'mlp2x_gelu'), 'moe'")

    @property
    def mlp_depth(self) -> int | None:
        m = _MLP_RE.match(self.type)
        return int(m.group(1)) if m else None

    def build(self, in_features: int, out_features: int, num_tokens: int | None = None) -> nn.Module:
        """num_tokens: image tokens per image, needed when position_embedding is set."""
        base = _build_base(self, in_features, out_features)
        if not self.position_embedding:
            return base
        if not num_tokens or num_tokens < 1:
            raise ValueError(f"projector position_embedding needs the number of image tokens, got {num_tokens!r}")
        return PositionedProjector(base, num_tokens, out_features)


class MLPProjector(nn.Sequential):
    """Linear, then (GELU, Linear) x (depth - 1)."""

    def __init__(self, in_features: int, out_features: int, depth: int, bias: bool = True):
        layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features, bias=bias)]
        super().__init__(*layers)


class MoEProjector(nn.Module):
    """Linear(C, D) -> GELU -> MoE of (Linear(D, D) -> GELU -> Linear(D, D)) experts."""

    def __init__(self, input_linear: nn.Linear, moe: nn.Module):
        super().__init__()
        self.input = input_linear
        self.act = nn.GELU()
        self.moe = moe

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.moe(self.act(self.input(x_BTC)))


class PositionedProjector(nn.Module):
    """A projector plus one learned vector per image-token position, added to its output.

    Starts at zero, so wrapping changes nothing until training moves it.
    """

    def __init__(self, base: nn.Module, num_tokens: int, dim: int):
        super().__init__()
        self.base = base
        self.position_embedding = nn.Parameter(torch.zeros(num_tokens, dim))

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        out_BTD = self.base(x_BTC)
        if out_BTD.shape[-2] != self.position_embedding.shape[0]:
            raise ValueError(
                f"projector position_embedding has {self.position_embedding.shape[0]} positions but the "
                f"vision tower gave {out_BTD.shape[-2]} tokens per image"
            )
        return out_BTD + self.position_embedding.to(out_BTD.dtype)


class _DenseFFNView(nn.Module):
    """Presents two Linears of an MLP projector with the fc1/fc2/activation_fn names upcycle_ffn reads."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.fc2, self.activation_fn = fc1, fc2, nn.GELU()


def build_projector(config: ProjectorConfig | dict, in_features: int, out_features: int,
                    num_tokens: int | None = None) -> nn.Module:
    """`ProjectorConfig.build` for a config given as plain data."""
    return parse(ProjectorConfig, config).build(in_features, out_features, num_tokens)


def _build_base(config: ProjectorConfig, in_features: int, out_features: int) -> nn.Module:
    if config.type == "identity":
        if in_features != out_features:
            raise ValueError(
                f"projector 'identity' needs equal widths, but the vision tower gives {in_features} "
                f"and the language model expects {out_features}: use 'linear' or 'mlp2x_gelu'"
            )
        return nn.Identity()
    if config.type == "linear":
        return nn.Linear(in_features, out_features, bias=config.bias)
    if config.type == "moe":
        if config.moe_config is None:
            raise ValueError("projector 'moe' needs an MoE config (set `moe` in the model config)")
        from llava_smoe.moe import MoELayer

        moe = MoELayer(config.moe_config, hidden_size=out_features, ffn_size=out_features,
                       ffn_kind="gelu", activation="gelu", bias=config.bias, layer_idx=0)
        return MoEProjector(nn.Linear(in_features, out_features, bias=config.bias), moe)
    return MLPProjector(in_features, out_features, config.mlp_depth, bias=config.bias)


def upcycle_projector(projector: nn.Module, moe_config: MoEConfig) -> nn.Module:
    """mlp3x_gelu -> "moe" projector: the first Linear is kept, the last two become every expert.

    A PositionedProjector keeps its position embedding around the upcycled base.
    """
    from llava_smoe.moe import upcycle_ffn

    if isinstance(projector, PositionedProjector):
        projector.base = upcycle_projector(projector.base, moe_config)
        return projector
    if not (isinstance(projector, MLPProjector) and len(projector) == 5):
        raise ValueError(
            f"only an mlp3x_gelu projector can be upcycled to 'moe' (got {type(projector).__name__} "
            f"with {len(projector) if isinstance(projector, nn.Sequential) else '?'} modules); "
            "train the dense stage with projector.type='mlp3x_gelu' or build with projector.type='moe'"
        )
    fc_in, fc1, fc2 = projector[0], projector[2], projector[4]
    return MoEProjector(fc_in, upcycle_ffn(_DenseFFNView(fc1, fc2), moe_config, layer_idx=0))
