"""Published architectures as files: real shapes with random weights, nothing downloaded.

Each `NAME.yaml` beside this module holds one model's published hyperparameters (the
transformers config of its hub checkpoint, under `config`), the hub ids it describes and its
kind (`vision` or `language_model`). These files are the one place those numbers live. A recipe
builds a component from one with `architecture: NAME` (random weights), optionally replacing
some keys (`hf_config` of a vision tower, `config` of a language model), e.g. fewer layers for
a dry run at real widths:

    vision: {backend: hf, architecture: clip-vit-large-patch14-336, hf_config: {num_hidden_layers: 3}}
    language_model: {architecture: qwen2.5-0.5b-instruct, config: {num_hidden_layers: 4}}

`llava-smoe plan` reads them in place of the configs of hub ids it cannot download
(`architecture_for_hub_id`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["vision", "language_model"]
KINDS = ("vision", "language_model")
ARCHITECTURES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Architecture:
    name: str
    kind: Kind
    hub_ids: tuple[str, ...]
    config: dict[str, Any]  # a transformers config dict with `model_type`

    def resolved(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The config dict with `overrides` replacing its keys."""
        return {**self.config, **(overrides or {})}


@functools.cache
def _all() -> dict[str, Architecture]:
    import yaml

    found = {}
    for path in sorted(ARCHITECTURES_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("kind") not in KINDS or "model_type" not in data.get("config", {}):
            raise ValueError(f"{path}: an architecture file needs kind ({KINDS}) and config.model_type")
        found[path.stem] = Architecture(path.stem, data["kind"], tuple(data.get("hub_ids", ())), data["config"])
    return found


def available_architectures(kind: Kind | None = None) -> list[str]:
    return [name for name, a in _all().items() if kind is None or a.kind == kind]


def get_architecture(name: str, kind: Kind) -> Architecture:
    """The architecture called `name`; ValueError naming the valid ones."""
    arch = _all().get(name)
    if arch is None or arch.kind != kind:
        raise ValueError(f"{name!r} is not a known {kind.replace('_', ' ')} architecture; "
                         f"known: {available_architectures(kind)}")
    return arch


def architecture_for_hub_id(hub_id: str, kind: Kind) -> Architecture | None:
    """The architecture file describing hub checkpoint `hub_id` (case-insensitive), if any."""
    for arch in _all().values():
        if arch.kind == kind and hub_id.lower() in (h.lower() for h in arch.hub_ids):
            return arch
    return None
