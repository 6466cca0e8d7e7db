"""YAML recipes: `base:` inheritance plus dotted command-line overrides.

    llava-smoe train train/llava15/moe.yaml train.max_steps=100 optim.groups.0.lr=2e-5

An override's value is parsed as a YAML scalar (or flow list / mapping: `optim.betas=[0.9,0.95]`).
Integer path parts index into lists. Unknown keys are rejected when the dict becomes a
`RunConfig`, naming the key and the valid ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from llava_smoe.config import ConfigError
from llava_smoe.training.config import RunConfig


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a recipe (following `base:` chains), apply `key.sub=value` overrides, validate."""
    data = load_recipe_dict(path)
    apply_overrides(data, parse_overrides(overrides))
    return RunConfig.parse(data)


def load_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged dict of a recipe and its bases; a `base` path is relative to its file."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"recipe base chain loops: {chain}")
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string, got {base!r}")
    return merge(load_recipe_dict(path.parent / base, (*_seen, path)), data)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; anything else (lists included) in `over` replaces `base`."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any]]:
    """`['train.seed=3']` -> `[(['train', 'seed'], 3)]`."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY.SUB=VALUE, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> None:
    """Set each dotted path in place; missing mappings are created so validation names the key."""
    for parts, value in overrides:
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            node = _child(node, part, where)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, ".".join(parts))] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[:-1])} is a value, not a section")


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {where}: its parent is a value, not a section")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, where: str) -> int:
    try:
        i = int(part)
    except ValueError:
        raise ConfigError(f"override path {where}: {part!r} indexes a list, use an integer") from None
    if not -len(node) <= i < len(node):
        raise ConfigError(f"override path {where}: index {i} out of range for a list of {len(node)}")
    return i
