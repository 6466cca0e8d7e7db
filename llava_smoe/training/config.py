"""Run configuration: one validated dataclass per concern, composed into `RunConfig`.

`build_dataclass` turns a plain dict (from a YAML recipe) into these dataclasses, rejecting
unknown keys with the dotted path and the valid keys, and coercing YAML's loose scalars
(PyYAML reads `1e-3` as a string) to the declared types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe value or key is invalid; the message names the dotted path."""


@dataclass
class ParamGroupConfig:
    """Parameters whose names match any of `patterns` (fnmatch) train with this lr / decay.

    A parameter joins the first group that matches it; lr 0 freezes the group.
    """

    name: str
    patterns: list[str]
    lr: float
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ConfigError(f"optim group {self.name!r}: patterns is empty; give at least one, e.g. ['*']")
        if self.lr < 0:
            raise ConfigError(f"optim group {self.name!r}: lr must be >= 0 (0 freezes), got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim group {self.name!r}: weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class OptimConfig:
    """AdamW over named parameter groups, cosine schedule with linear warm-up."""

    groups: list[ParamGroupConfig]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    # torch's fused AdamW kernel (one pass over every tensor): null picks it wherever it runs
    # (floating-point parameters on CPU or CUDA); false keeps the per-tensor loop.
    fused: bool | None = None

    def __post_init__(self) -> None:
        if not self.groups:
            raise ConfigError("optim.groups is empty: add e.g. {name: all, patterns: ['*'], lr: 1.0e-4}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"optim.groups: names must be unique, got {names}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig:
    """How long, how big, how precise, and what side effects (logs, checkpoints)."""

    output_dir: str
    seed: int = 0
    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / epochs
    epochs: float | None = None
    micro_batch_size: int = 1  # per process
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "bf16"
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    log_every: int = 10
    save_every: int = 0  # 0: only the final checkpoint
    keep_last: int = 2
    eval_every: int = 0  # 0: evaluate only at the end (when the task has an eval set)
    max_nonfinite: int = 5  # stop after this many skipped non-finite steps
    backend: Literal["torch", "deepspeed"] = "torch"
    deepspeed_config: str | None = None  # JSON path; "auto" values filled from this config
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a checkpoint path
    num_workers: int = 0
    # Batches of one modality and similar length (LLaVA's group_by_modality_length): less padding
    # when short Q&A and long captions share a stage. Needs a task whose dataset records lengths.
    group_by_modality_length: bool = False
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError("train: set exactly one of max_steps or epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        for name in ("micro_batch_size", "grad_accum", "log_every", "keep_last", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.backend == "deepspeed" and not self.deepspeed_config:
            raise ConfigError("train.backend=deepspeed needs train.deepspeed_config (e.g. train/deepspeed/zero2.json)")


@dataclass
class RunConfig:
    """A whole run: which task (and its own options), how to train, how to optimise."""

    task: str
    train: TrainConfig
    optim: OptimConfig
    task_options: dict[str, Any] = field(default_factory=dict)  # the recipe section named `task`

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, self.task: self.task_options}
        out["train"] = dataclasses.asdict(self.train)
        out["optim"] = dataclasses.asdict(self.optim)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        task = data.pop("task", None)
        if not isinstance(task, str) or not task:
            raise ConfigError("recipe: 'task' is missing; name one, e.g. task: toy")
        valid = {"train", "optim", task}
        unknown = sorted(set(data) - valid)
        if unknown:
            valid_keys = sorted(valid | {"task", "base"})
            raise ConfigError(f"recipe: unknown key(s) {unknown}; valid top-level keys: {valid_keys}")
        for required in ("train", "optim"):
            if required not in data:
                raise ConfigError(f"recipe: section '{required}' is missing")
        task_options = data.get(task) or {}
        if not isinstance(task_options, dict):
            raise ConfigError(f"recipe: section '{task}' must be a mapping, got {type(task_options).__name__}")
        return cls(
            task=task,
            train=build_dataclass(TrainConfig, data["train"], "train"),
            optim=build_dataclass(OptimConfig, data["optim"], "optim"),
            task_options=task_options,
        )


def build_dataclass(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a dict; `where` is the dotted path used in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} ({data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[f'{where}.{k}' for k in unknown]}; valid keys: {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {[f'{where}.{k}' for k in missing]}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
