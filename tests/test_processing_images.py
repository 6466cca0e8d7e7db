import numpy as np
import pytest
import torch
from PIL import Image

from llava_smoe.config import parse
from llava_smoe.model.vision import CLIP_MEAN
from llava_smoe.processing import (
    ImageProcessingConfig,
    load_image,
    preprocess_image,
    to_rgb,
)

# One 8-bit step after normalisation, the tolerance for "is this colour".
TOL = 1.0 / 255 / min(0.26, 0.27) + 1e-4


def denorm(x, config):
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return x * std + mean


def test_transparent_rgba_is_composited_on_the_mean_colour():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    config = ImageProcessingConfig(image_size=10, mode="resize", resample="nearest")
    x = preprocess_image(image, config)
    # Mean colour normalises to ~0; the opaque pixel stays red.
    assert x[:, 5, 5].abs().max() < TOL
    assert torch.allclose(denorm(x, config)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)


def test_grayscale_becomes_three_equal_channels():
    image = Image.new("L", (6, 6), 200)
    config = ImageProcessingConfig(image_size=6, resample="nearest")
    rgb = denorm(preprocess_image(image, config), config)
    assert torch.allclose(rgb, torch.full_like(rgb, 200 / 255), atol=1e-5)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    arr = np.array([[0, 65535]], dtype=np.uint16).repeat(2, axis=0)
    rgb = to_rgb(Image.fromarray(arr), (0, 0, 0))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_palette_image_with_transparency():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 255] + [0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0  # palette entry 0 (blue) is transparent
    rgb = to_rgb(image, (10, 20, 30))
    assert rgb.getpixel((0, 0)) == (10, 20, 30)
    assert rgb.getpixel((1, 1)) == (0, 255, 0)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    loaded = load_image(str(path))
    rgb = to_rgb(loaded, (0, 0, 0))
    assert rgb.size == (20, 40)
    assert rgb.getpixel((10, 5)) == (255, 0, 0) and rgb.getpixel((10, 35)) == (0, 0, 255)


def test_pad_mode_pads_with_the_mean_colour():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    config = ImageProcessingConfig(image_size=40, mode="pad", resample="nearest")
    x = preprocess_image(image, config)
    assert x.shape == (3, 40, 40)
    assert x[:, :9, :].abs().max() < TOL and x[:, 31:, :].abs().max() < TOL  # padding bands
    rgb = denorm(x, config)
    assert rgb[:, 12:28, :].abs().max() < 1e-5  # the black image itself
    assert config.mean_color == tuple(int(255 * m) for m in CLIP_MEAN)  # LLaVA's expand2square truncates


def test_center_crop_and_resize_modes():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the far left
    crop = ImageProcessingConfig(image_size=20, mode="center_crop", resample="nearest")
    resize = ImageProcessingConfig(image_size=20, mode="resize", resample="nearest")
    assert denorm(preprocess_image(image, crop), crop).max() < 1e-5  # the strip is cropped away
    assert denorm(preprocess_image(image, resize), resize)[:, :, 0].min() > 1 - 1e-5  # squeezed in


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": 0}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"mode": "stretch"}, "mode"),
        ({"resample": "lanczos9"}, "resample"),
    ],
)
def test_image_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageProcessingConfig(**kwargs)


def test_image_config_round_trip():
    config = ImageProcessingConfig(image_size=48, mode="center_crop")
    assert parse(ImageProcessingConfig, config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown key 'size'"):
        parse(ImageProcessingConfig, {"size": 3})
