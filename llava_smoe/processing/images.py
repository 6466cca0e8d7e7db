"""Image preprocessing: any PIL image -> normalised float tensor [3, S, S] for the vision tower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from llava_smoe.config import Config, invalid
from llava_smoe.model.vision import CLIP_MEAN, CLIP_STD

ImageMode = Literal["pad", "resize", "center_crop"]
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


@dataclass
class ImageProcessingConfig(Config):
    """How images become tensors. `mode`: 'pad' pads to a square with the mean colour (LLaVA-1.5's
    choice: nothing is cropped away), 'resize' stretches, 'center_crop' resizes the short side and
    crops (CLIP's preprocessing). Each gives the pixels transformers' LLaVA / CLIP image processors
    give with the same settings (PIL backend)."""

    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    mode: ImageMode = "pad"
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"

    def validate(self) -> None:
        if self.image_size <= 0:
            raise invalid("image_size", f"must be a positive int, got {self.image_size!r}")
        if not all(0.0 <= v <= 1.0 for v in self.mean):
            raise invalid("mean", f"must be 3 values in [0, 1] (RGB, as fractions of 255), got {list(self.mean)}")
        if not all(v > 0 for v in self.std):
            raise invalid("std", f"must be 3 positive values (RGB), got {list(self.std)}")

    @property
    def mean_color(self) -> tuple[int, int, int]:
        """The padding colour: the mean truncated to 8 bits, as LLaVA's expand2square and
        transformers' LLaVA image processor compute it (so exported checkpoints pad alike)."""
        return tuple(int(255 * v) for v in self.mean)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Apply EXIF orientation, composite transparency onto `background`, return an RGB image."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        # Palette images may carry transparency only through info["transparency"].
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: rescale to 8 bits instead of letting convert() clip.
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_image(image: Image.Image, config: ImageProcessingConfig) -> torch.Tensor:
    """One PIL image -> float tensor [3, S, S], normalised with the config's mean and std."""
    size, resample = config.image_size, RESAMPLE[config.resample]
    image = to_rgb(image, config.mean_color)
    if config.mode == "pad":
        image = pad_to_square(image, config.mean_color).resize((size, size), resample)
    elif config.mode == "resize":
        image = image.resize((size, size), resample)
    else:
        w, h = image.size
        # The short side becomes `size`, the long one int(size * long / short): CLIP's resize.
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = image.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    x_HWC = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div_(255.0)
    mean = torch.tensor(config.mean).view(1, 1, 3)
    std = torch.tensor(config.std).view(1, 1, 3)
    return ((x_HWC - mean) / std).permute(2, 0, 1).contiguous()


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image file (raises on truncated or corrupt files)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()
