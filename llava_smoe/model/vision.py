"""Vision towers: open_clip models and transformers' CLIP / SigLIP vision encoders.

A tower maps pixel values [B, 3, H, W] to patch features [B, T, C] taken from one hidden
layer (`feature_layer`, HF `hidden_states` indexing: 0 is the embedding output, -1 the last
block, -2 the penultimate as in LLaVA). It also reports the preprocessing it was trained with
(image size, mean, std) and how many tokens an image becomes, from which a new assembly's
processor is made; from then on the processor owns the preprocessing.

`VisionTower.resolved_config()` returns a config that rebuilds the same architecture without
any external file (the open_clip model dict / the HF vision config dict are embedded), which
the VLM stores in its own config.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from llava_smoe.config import Config, invalid, parse
from llava_smoe.moe.config import MoELayers

FeatureSelect = Literal["patch", "cls_patch"]

# Mean/std by vision model family (the values the towers were trained with); a checkpoint's
# preprocessor_config.json overrides them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)

# HF model_type -> (vision model class name, family). Full CLIP/SigLIP checkpoints load their vision half.
_HF_VISION_MODELS = {
    "clip": ("CLIPVisionModel", "clip"),
    "clip_vision_model": ("CLIPVisionModel", "clip"),
    "siglip": ("SiglipVisionModel", "siglip"),
    "siglip_vision_model": ("SiglipVisionModel", "siglip"),
}


@dataclass
class VisionTowerConfig(Config):
    """Which vision encoder to use and which of its features feed the projector.

    backend: "hf" (transformers CLIPVisionModel / SiglipVisionModel) or "open_clip".
    name_or_path: HF local folder or hub id; open_clip model name (built-in or registered).
    pretrained: open_clip only: a local checkpoint file for the weights.
    hf_config: HF only: a vision config dict (with "model_type"); builds without weights. With
        `architecture`, only the keys that replace the architecture's (e.g. num_hidden_layers).
    architecture: HF only: a published architecture of `llava_smoe.model.architectures`
        (e.g. clip-vit-large-patch14-336); real shapes, random weights, no download.
    open_clip_model_config: open_clip only: the model dict ({"embed_dim", "vision_cfg",
        "text_cfg"}); builds without consulting open_clip's registry.
    open_clip_model_config_path: open_clip only: a JSON file holding that dict.
    feature_layer: hidden layer whose tokens are used (HF hidden_states indexing).
    feature_select: "patch" drops the CLS token, "cls_patch" keeps it (CLIP-style towers only).
    freeze: freeze the tower's weights at build time (MoE layers added later stay trainable).
    freeze_except: with freeze, the tower's parameters whose names match one of these patterns
        (fnmatch, e.g. "*position_embedding*") still train: a frozen CLIP whose position
        embedding adapts to say where each patch is, in weights any CLIP loader reads.
    moe: the tower's MoE blocks; written by MoE surgery (a recipe places them with
        `moe_placement.vision_tower`).
    """

    backend: Literal["hf", "open_clip"] = "hf"
    name_or_path: str | None = None
    pretrained: str | None = None
    hf_config: dict[str, Any] | None = None
    architecture: str | None = None
    open_clip_model_config: dict[str, Any] | None = None
    open_clip_model_config_path: str | None = None
    feature_layer: int = -2
    feature_select: FeatureSelect = "patch"
    freeze: bool = True
    freeze_except: list[str] = field(default_factory=list)
    moe: MoELayers | None = None

    def validate(self) -> None:
        if self.backend == "hf":
            if self.architecture is not None and self.name_or_path is not None:
                raise invalid("architecture", "give architecture (a published architecture, random weights) or "
                                              "name_or_path (a local folder or hub id), not both")
            if self.architecture is None and self.name_or_path is None and self.hf_config is None:
                raise invalid("name_or_path", "the 'hf' backend needs name_or_path (a local folder or hub id), "
                                              "architecture (a published architecture, random weights) or hf_config "
                                              "(a CLIP/SigLIP vision config dict with 'model_type')")
            if self.architecture is not None:
                from .architectures import get_architecture

                try:
                    get_architecture(self.architecture, "vision")
                except ValueError as exc:
                    raise invalid("architecture", str(exc)) from None
            elif self.hf_config is not None and "model_type" not in self.hf_config:
                raise invalid("hf_config", "must contain 'model_type' (e.g. 'clip_vision_model')")
        if self.backend == "open_clip" and self.name_or_path is None:
            raise invalid("name_or_path", "the 'open_clip' backend needs name_or_path (the open_clip model name)")
        if self.backend == "open_clip" and self.architecture is not None:
            raise invalid("architecture", "applies to backend 'hf' only")
        open_clip_only = ("pretrained", "open_clip_model_config", "open_clip_model_config_path")
        set_here = [name for name in open_clip_only if getattr(self, name) is not None]
        if self.backend == "hf" and set_here:
            raise invalid(set_here[0], "applies to backend 'open_clip' only")

    def hf_config_dict(self) -> dict[str, Any] | None:
        """The HF vision config this builds from without a checkpoint (architecture + hf_config), if any."""
        if self.architecture is not None:
            from .architectures import get_architecture

            return get_architecture(self.architecture, "vision").resolved(self.hf_config)
        return self.hf_config

    def build(self, *, load_weights: bool = True, attn_implementation: str | None = None,
              dtype: torch.dtype | None = None) -> VisionTower:
        """The tower; with load_weights=False only the architecture (weights come later)."""
        if self.backend == "open_clip":
            return OpenClipVisionTower(self, load_weights=load_weights, dtype=dtype)
        return HFVisionTower(self, load_weights=load_weights, attn_implementation=attn_implementation, dtype=dtype)


class VisionTower(nn.Module):
    """Common interface: forward(pixel_values) -> features [B, T, C]."""

    config: VisionTowerConfig
    hidden_size: int
    image_size: int
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    has_cls_token: bool

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + (1 if self.config.feature_select == "cls_patch" else 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def resolved_config(self) -> VisionTowerConfig:
        """A config that rebuilds this architecture from itself alone (no files, no downloads)."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, each with an `mlp` FFN (MoE surgery targets those)."""
        raise NotImplementedError

    @property
    def feature_block(self) -> int:
        """0-based index of the last block whose output is used."""
        return _block_index(self.config.feature_layer, len(self.blocks()))

    def _select(self, tokens_BLC: torch.Tensor) -> torch.Tensor:
        if self.has_cls_token and self.config.feature_select == "patch":
            return tokens_BLC[:, 1:]
        return tokens_BLC

    def _finish_init(self) -> None:
        if self.config.feature_select == "cls_patch" and not self.has_cls_token:
            raise invalid("feature_select", f"vision tower {self.config.name_or_path or '(from config)'} has no "
                                            "CLS token (SigLIP-style): use 'patch'")
        _block_index(self.config.feature_layer, len(self.blocks()))  # validates the range
        self.apply_freeze()

    def apply_freeze(self) -> None:
        """With config.freeze, stop gradients to the tower's dense weights (MoE layers placed in it
        train, and those named by config.freeze_except)."""
        if self.config.freeze:
            self._set_dense_trainable(False)

    def set_freeze(self, freeze: bool) -> None:
        """Freeze or unfreeze the tower's dense weights (e.g. to train a frozen checkpoint's tower)."""
        self.config = replace(self.config, freeze=freeze)
        self._set_dense_trainable(not freeze)

    def _set_dense_trainable(self, trainable: bool) -> None:
        from llava_smoe.moe import MoELayer

        moe_params = {id(p) for m in self.modules() if isinstance(m, MoELayer) for p in m.parameters()}
        patterns = self.config.freeze_except
        kept = set()
        for name, p in self.named_parameters():
            if id(p) in moe_params:
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                kept.add(name)
                p.requires_grad_(True)
            else:
                p.requires_grad_(trainable)
        unmatched = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(n, pattern) for n in kept)]
        if unmatched:
            raise invalid("freeze_except", f"{unmatched[0]!r} matches none of the tower's parameters "
                                           f"(e.g. {next(n for n, _ in self.named_parameters())!r})")


def _block_index(feature_layer: int, num_blocks: int) -> int:
    """HF hidden_states index (0 = embeddings, i = output of block i-1) -> 0-based block index."""
    num_states = num_blocks + 1
    if not -num_states <= feature_layer < num_states:
        raise invalid("feature_layer", f"{feature_layer} is out of range for a tower with {num_blocks} blocks "
                                       f"(valid: {-num_states}..{num_states - 1}; -2 is the penultimate block)")
    state = feature_layer % num_states
    if state == 0:
        raise invalid("feature_layer", f"{feature_layer} selects the patch embeddings (no block output); "
                                       "use a block output")
    return state - 1


class HFVisionTower(VisionTower):
    """transformers CLIPVisionModel / SiglipVisionModel."""

    def __init__(self, config: VisionTowerConfig, *, load_weights: bool = True,
                 attn_implementation: str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        import transformers

        kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if load_weights and config.name_or_path is not None:
            path = config.name_or_path
            cls = getattr(transformers, _hf_family(transformers.AutoConfig.from_pretrained(path).model_type)[0])
            if cls.__name__ == "SiglipVisionModel":
                kwargs["vision_use_head"] = False  # the pooling head is unused by a VLM
            # A full CLIP/SigLIP checkpoint holds a text tower too: its keys are expected leftovers,
            # so transformers' report of them is silenced; a missing vision key is an error instead.
            with _logging_disabled(logging.WARNING):
                self.model, info = cls.from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                       output_loading_info=True, **kwargs)
            if info["missing_keys"]:
                raise ValueError(f"vision tower {path}: the checkpoint lacks {sorted(info['missing_keys'])[:5]} "
                                 f"({len(info['missing_keys'])} missing weights)")
            self._pretrained_preprocessing = _preprocessor_config(path)
        else:
            if config.hf_config_dict() is not None:
                hf_cfg = _hf_vision_config(config.hf_config_dict())
            else:
                hf_cfg = transformers.AutoConfig.from_pretrained(config.name_or_path)
                hf_cfg = getattr(hf_cfg, "vision_config", None) or hf_cfg
            cls = getattr(transformers, _hf_family(hf_cfg.model_type)[0])
            if cls.__name__ == "SiglipVisionModel":
                hf_cfg.vision_use_head = False
            self.model = cls._from_config(hf_cfg, dtype=dtype, **kwargs)
        self.config = config
        vc = self.model.config
        family = _hf_family(vc.model_type)[1]
        self.hidden_size = vc.hidden_size
        self.image_size = vc.image_size
        self.patch_size = vc.patch_size
        self.has_cls_token = family == "clip"
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (_SIGLIP_MEAN, _SIGLIP_STD)
        pp = getattr(self, "_pretrained_preprocessing", {})
        self.image_mean = tuple(float(v) for v in pp.get("image_mean", default_mean))
        self.image_std = tuple(float(v) for v in pp.get("image_std", default_std))
        self._finish_init()

    def resolved_config(self) -> VisionTowerConfig:
        hf_cfg = self.model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
            hf_cfg.pop(key, None)
        return replace(self.config, hf_config=hf_cfg, architecture=None)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values.to(self.dtype), output_hidden_states=True)
        return self._select(out.hidden_states[self.config.feature_layer])


class OpenClipVisionTower(VisionTower):
    """The image half of an open_clip model (ViT towers with `forward_intermediates`)."""

    def __init__(self, config: VisionTowerConfig, *, load_weights: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        import open_clip

        name = config.name_or_path
        model_cfg = config.open_clip_model_config
        if model_cfg is None and config.open_clip_model_config_path is not None:
            model_cfg = json.loads(Path(config.open_clip_model_config_path).read_text())
        if model_cfg is not None:
            _register_open_clip_config(name, model_cfg)
        elif open_clip.get_model_config(name) is None:
            raise invalid("name_or_path", f"open_clip has no model named {name!r}: give open_clip_model_config "
                                          "(a dict) or open_clip_model_config_path (a JSON file) for custom models")
        pretrained = config.pretrained if load_weights else None
        if pretrained is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"vision.pretrained: open_clip checkpoint {pretrained} does not exist")
        # Random weights are intended here (weights come later): silence open_clip's warning about them.
        with _logging_disabled(logging.WARNING if pretrained is None else logging.NOTSET):
            clip = open_clip.create_model(
                name, pretrained=pretrained, load_weights=pretrained is not None, pretrained_text=False,
                weights_only=True, device=torch.get_default_device(),  # the meta device under from_pretrained
            )
        visual = clip.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(
                f"open_clip model {name!r} has a {type(visual).__name__} image tower; only ViT towers "
                "(open_clip.transformer.VisionTransformer) expose per-layer patch tokens here"
            )
        self.model = visual.to(dtype) if dtype is not None else visual
        del clip  # the text tower is not needed
        pp = visual.preprocess_cfg
        self.config = replace(config, open_clip_model_config=open_clip.get_model_config(name),
                              open_clip_model_config_path=None)
        self.hidden_size = visual.transformer.width
        self.image_size = int(visual.image_size[0])
        self.patch_size = int(visual.patch_size[0])
        if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(f"open_clip model {name!r}: only square images and patches are supported")
        self.has_cls_token = True
        self.image_mean = tuple(float(v) for v in pp["mean"])
        self.image_std = tuple(float(v) for v in pp["std"])
        self._finish_init()
        # open_clip initialised these weights itself: transformers' init must leave them alone
        # (under from_pretrained they are on the meta device and loaded next).
        if next(self.model.parameters()).device.type != "meta":
            for module in self.model.modules():
                module._is_hf_initialized = True

    def resolved_config(self) -> VisionTowerConfig:
        return replace(self.config, pretrained=None)

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(
            pixel_values.to(self.dtype), indices=[self.feature_block], stop_early=True,
            intermediates_only=True, output_fmt="NLC", output_extra_tokens=True,
        )
        patches_BPC = out["image_intermediates"][0]
        if self.config.feature_select == "cls_patch":
            return torch.cat([out["image_intermediates_prefix"][0], patches_BPC], dim=1)
        return patches_BPC


def build_vision_tower(config: VisionTowerConfig | dict, **kwargs: Any) -> VisionTower:
    """`VisionTowerConfig.build` for a config given as plain data."""
    return parse(VisionTowerConfig, config).build(**kwargs)


def _hf_family(model_type: str) -> tuple[str, str]:
    try:
        return _HF_VISION_MODELS[model_type]
    except KeyError:
        raise ValueError(
            f"vision: unsupported transformers model_type {model_type!r}; supported: {sorted(_HF_VISION_MODELS)}"
        ) from None


def _hf_vision_config(d: dict[str, Any]):
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    # A full CLIP/SigLIP config carries the vision half in `vision_config`.
    return getattr(cfg, "vision_config", None) or cfg


def _preprocessor_config(path: str) -> dict[str, Any]:
    """A local checkpoint's preprocessor_config.json (its image_mean / image_std), or {}."""
    pp_file = Path(path) / "preprocessor_config.json"
    return json.loads(pp_file.read_text()) if pp_file.is_file() else {}


@contextlib.contextmanager
def _logging_disabled(level: int):
    previous = logging.root.manager.disable
    logging.disable(max(level, previous))
    try:
        yield
    finally:
        logging.disable(previous)


def _register_open_clip_config(name: str, model_cfg: dict[str, Any]) -> None:
    """open_clip resolves architectures by name from JSON files: register this dict under `name`."""
    import open_clip

    if open_clip.get_model_config(name) == model_cfg:
        return
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(model_cfg)
    if missing:
        raise ValueError(f"open_clip model config for {name!r} lacks keys {sorted(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)  # reads the file now; the path is ignored once gone
