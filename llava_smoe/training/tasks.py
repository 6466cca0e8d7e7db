"""Tasks: what the trainer trains, built from the recipe section named by `task:`.

A task is a config class plus a builder returning `TaskParts`, in one module of
`llava_smoe/tasks/` (imported when a recipe names it):

    @dataclass
    class MyTaskConfig(Config):
        data_path: str
        seq_len: int = 512

    @register_task("mine", MyTaskConfig)
    def build_mine(config: MyTaskConfig, run: RunConfig) -> TaskParts:
        ...

Contract with the trainer:
- `model(**batch)` (or `model(batch)` when the collated batch is not a mapping) returns an
  object with `.loss`, the language-model loss only; MoE auxiliary losses are collected by the
  trainer from the model's `MoELayer`s. A batch holds the model's keyword arguments and nothing
  else, except `skipped` (samples a data policy dropped, counted by the trainer).
- Token-weighted loss: when `count_loss_items(batch)` gives a count (supervised tokens), the
  model takes `num_items_in_batch` and returns the *sum* of its token losses divided by it; the
  trainer passes the step's total over every micro-batch and rank, so the loss is the mean over
  the step's tokens. Tasks without it (None: CLIP's contrastive loss) average per micro-batch.
- Datasets are map-style and deterministic per index (the sampler restarts mid-epoch on resume).
- `export_fn(model, out_dir)` writes the final artefact (e.g. `save_pretrained`); it runs on
  rank 0 with full weights (gathered first under ZeRO-3).
- `count_tokens(batch)` feeds tokens/s; the default counts `attention_mask` ones, else
  `input_ids` elements.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from llava_smoe.config import ConfigError

if TYPE_CHECKING:
    from llava_smoe.training.config import RunConfig

# Tasks that ship with the package (llava_smoe/tasks/, and the toy task of llava_smoe/testing),
# imported when a recipe names them so that registering costs nothing.
_BUILTIN_TASK_MODULES: dict[str, str] = {
    "clip": "llava_smoe.tasks.clip",
    "facts": "llava_smoe.tasks.facts",
    "lm": "llava_smoe.tasks.lm",
    "vlm": "llava_smoe.tasks.vlm",
    "toy": "llava_smoe.testing.toy",
}
IGNORE_INDEX = -100


def default_count_tokens(batch: Any) -> int:
    if isinstance(batch, Mapping):
        if isinstance(batch.get("attention_mask"), torch.Tensor):
            return int(batch["attention_mask"].sum())
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return batch["input_ids"].numel()
    return 0


def count_supervised_tokens(batch: Any) -> int:
    """Tokens a causal LM's loss is taken on: labels other than IGNORE_INDEX, after the shift
    (position t predicts token t + 1, so the first position of each row predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@dataclass
class TaskParts:
    model: nn.Module
    train_dataset: Dataset
    collate_fn: Callable[[list[Any]], Any]
    eval_dataset: Dataset | None = None
    export_fn: Callable[[nn.Module, Path], None] | None = None
    count_tokens: Callable[[Any], int] = default_count_tokens
    count_loss_items: Callable[[Any], int] | None = None
    # More eval metrics ("eval/<name>": value) from the bare model in eval mode, after the eval loss;
    # every process runs it (ZeRO-3 gathers weights collectively), the main one logs it.
    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass(frozen=True)
class Task:
    name: str
    config_cls: type
    build_fn: Callable[[Any, RunConfig], TaskParts]

    def build(self, run: RunConfig) -> TaskParts:
        try:
            parts = self.build_fn(run.task_config, run)
        except ConfigError as exc:  # a builder's errors are about its own section
            raise exc.within(self.name) if exc.path else exc from None
        if not isinstance(parts, TaskParts):
            raise TypeError(f"task {self.name!r} returned {type(parts).__name__}, expected TaskParts")
        return parts


_REGISTRY: dict[str, Task] = {}


def register_task(name: str, config_cls: type) -> Callable:
    """Decorator registering `build_fn(config, run) -> TaskParts` under `name`."""

    def decorator(build_fn: Callable[[Any, RunConfig], TaskParts]) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].build_fn is not build_fn:
            raise ValueError(f"task {name!r} is already registered by {_REGISTRY[name].build_fn.__module__}")
        _REGISTRY[name] = Task(name, config_cls, build_fn)
        return build_fn

    return decorator


def get_task(name: str) -> Task:
    if name not in _REGISTRY and name in _BUILTIN_TASK_MODULES:
        importlib.import_module(_BUILTIN_TASK_MODULES[name])
    if name not in _REGISTRY:
        raise ConfigError(f"unknown task {name!r}; available: {available_tasks()}")
    return _REGISTRY[name]


def available_tasks() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_TASK_MODULES))
