"""Training-time image augmentation for tiny towers and small data: random shifts and mirroring.

Applied to a batch's pixel values inside the model call while the model is in training mode
(a forward pre-hook, so checkpoints and evaluation see the images as they are). A shift moves
things between cells and a mirror swaps left and right: only for data whose text never says
where things are (or only where, relative to each other, for shifts), hence off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llava_smoe.config import Config, invalid


@dataclass
class AugmentConfig(Config):
    """shift: a random translation of up to that many pixels each way (edges replicated), one per
    batch; hflip: each image mirrored with probability 1/2."""

    shift: int = 0
    hflip: bool = False

    def validate(self) -> None:
        if self.shift < 0:
            raise invalid("shift", f"must be >= 0 pixels, got {self.shift}")

    @property
    def enabled(self) -> bool:
        return bool(self.shift or self.hflip)


def augment(pixels_NCHW: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    if config.shift:
        s = config.shift
        side_h, side_w = pixels_NCHW.shape[-2:]
        padded = F.pad(pixels_NCHW, (s, s, s, s), mode="replicate")
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        pixels_NCHW = padded[..., dy:dy + side_h, dx:dx + side_w]
    if config.hflip:
        flip_N = torch.rand(pixels_NCHW.shape[0], device=pixels_NCHW.device) < 0.5
        pixels_NCHW = torch.where(flip_N.view(-1, 1, 1, 1), pixels_NCHW.flip(-1), pixels_NCHW)
    return pixels_NCHW


def augment_in_training(model: nn.Module, config: AugmentConfig) -> None:
    """Augment the `pixel_values` keyword of every training-mode call of `model`."""
    if not config.enabled:
        return

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if module.training and kwargs.get("pixel_values") is not None:
            kwargs["pixel_values"] = augment(kwargs["pixel_values"], config)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)
