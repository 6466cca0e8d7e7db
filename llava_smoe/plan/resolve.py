"""The model a recipe trains, built on the meta device: exact shapes and names, no weights, no download.

A stage that assembles a model (`vlm.model`) is built from its parts' configs: a local folder's
`config.json`, a hub id's architecture file (`llava_smoe.model.architectures`), or the recipe's
own config dicts. A stage that starts from a checkpoint (`vlm.init_from`) reads that
checkpoint's `config.json` if it exists; otherwise the recipe beside this one whose
`train.output_dir` + `/final` is that folder is resolved first (the chain of stages), and this
stage's changes (MoE upcycling, Mixture-of-Tokens conversion, tower freeze) are applied to it
with the code the `vlm` task runs. The optimizer groups then mark what trains, as the trainer does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from torch import nn

from llava_smoe.config import ConfigError
from llava_smoe.model.architectures import architecture_for_hub_id, available_architectures
from llava_smoe.training.config import RunConfig
from llava_smoe.training.recipe import apply_overrides, load_recipe_dict, parse_overrides

FINAL = "final"


@dataclass
class ResolvedRecipe:
    run: RunConfig
    model: nn.Module  # on the meta device; requires_grad marks what this stage trains
    chain: list[str]  # the recipes followed, this one last (or the checkpoint folder first)


def resolve_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ResolvedRecipe:
    """The run config and meta-device model of the recipe at `path` (with dotted overrides)."""
    from llava_smoe.training.optim import build_param_groups

    data = load_recipe_dict(path)
    apply_overrides(data, parse_overrides(overrides))
    run = RunConfig.parse(data)
    model, chain = _stage_model(Path(path), run, ())
    build_param_groups(model, run.optim)  # freezes what no group trains, as the trainer does
    return ResolvedRecipe(run, model, chain)


def _stage_model(path: Path, run: RunConfig, seen: tuple[Path, ...]) -> tuple[nn.Module, list[str]]:
    if run.task != "vlm":
        raise ConfigError(f"plan covers the vlm task; {path} trains task {run.task!r}", ("task",))
    from llava_smoe.tasks.vlm import apply_checkpoint_stage, new_model_spec

    config = run.task_config
    with torch.device("meta"):
        if config.model is not None:
            spec = offline_spec(config.model)
            vocab = spec.language_model.resolved_config().get("vocab_size", 1)
            model = new_model_spec(replace(config, model=spec), None, image_token_id=vocab - 1).build()
            chain = [_shown(path)]
        else:
            model, chain = _checkpoint_model(path, config.init_from, seen)
            model.train()
            apply_checkpoint_stage(model, config)
            chain.append(_shown(path))
        if config.vision_freeze is not None:
            model.set_vision_freeze(config.vision_freeze)
    return model, chain


def _checkpoint_model(path: Path, init_from: str, seen: tuple[Path, ...]) -> tuple[nn.Module, list[str]]:
    from llava_smoe.model import LlavaSmoeConfig, LlavaSmoeForConditionalGeneration

    folder = Path(init_from)
    if (folder / "config.json").is_file():
        return LlavaSmoeForConditionalGeneration(LlavaSmoeConfig.from_pretrained(folder)), [_shown(folder)]
    previous = _producing_recipe(path, folder)
    if previous is None:
        raise ConfigError(f"{init_from} holds no checkpoint and no recipe in {path.parent} writes it "
                          f"(train.output_dir + /{FINAL}); run the stage that makes it, or put its recipe "
                          "beside this one", ("vlm", "init_from"))
    if previous.resolve() in seen:
        raise ConfigError(f"the chain of stages loops: {' -> '.join(str(p) for p in (*seen, previous))}")
    run = RunConfig.parse(load_recipe_dict(previous))
    return _stage_model(previous, run, (*seen, path.resolve()))


def _shown(path: Path) -> str:
    """`path` relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _producing_recipe(path: Path, folder: Path) -> Path | None:
    """The recipe beside `path` whose `train.output_dir`/final is `folder`."""
    target = folder.resolve()
    for candidate in sorted(path.resolve().parent.glob("*.y*ml")):
        if candidate == path.resolve():
            continue
        try:
            train = load_recipe_dict(candidate).get("train", {})
        except (ConfigError, OSError, ValueError, AttributeError, yaml.YAMLError):
            continue  # not a recipe
        out = train.get("output_dir") if isinstance(train, dict) else None
        if isinstance(out, str) and (Path(out) / FINAL).resolve() == target:
            return candidate
    return None


def offline_spec(spec):
    """`spec` (a VLMConfig) with every checkpoint reference replaced by its config alone: a
    local folder's config.json, or the architecture file of a hub id."""
    from transformers import AutoConfig

    vision = spec.vision
    if vision.backend == "hf" and vision.name_or_path is not None:
        source = vision.name_or_path
        if Path(source).is_dir():
            hf = AutoConfig.from_pretrained(source)
            hf = getattr(hf, "vision_config", None) or hf
            vision = replace(vision, name_or_path=None, hf_config=_plain(hf.to_dict()))
        else:
            vision = replace(vision, name_or_path=None, hf_config=None,
                             architecture=_hub_architecture(source, "vision", ("vision", "name_or_path")))
    lm = spec.language_model
    if lm.name_or_path is not None:
        source = lm.name_or_path
        if Path(source).is_dir():
            lm = replace(lm, name_or_path=None, config=_plain(AutoConfig.from_pretrained(source).to_dict()))
        else:
            lm = replace(lm, name_or_path=None,
                         architecture=_hub_architecture(source, "language_model", ("language_model", "name_or_path")))
    # Attention kernels change no shape: plan with the one that builds anywhere.
    return replace(spec, vision=vision, language_model=lm, attn_implementation="sdpa")


def _hub_architecture(hub_id: str, kind: str, where: tuple[str, ...]) -> str:
    arch = architecture_for_hub_id(hub_id, kind)
    if arch is None:
        raise ConfigError(f"{hub_id!r} is not a local folder and no architecture file describes it "
                          f"(known: {available_architectures(kind)}); give a local folder, an `architecture` "
                          "or a config", ("vlm", "model", *where))
    return arch.name


def _plain(config: dict) -> dict:
    """A transformers config dict without the keys that describe a file rather than a model."""
    drop = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "auto_map")
    return {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in drop}
