"""Run configuration: one validated config per concern, composed into `RunConfig`.

`RunConfig` names the task; the recipe section of that name is parsed into the task's own
config class (`llava_smoe.training.tasks`), so a whole recipe is validated before anything is
built and `--print-config` shows every section with its defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from llava_smoe.config import Config, ConfigError, dump, invalid, parse


@dataclass
class ParamGroupConfig(Config):
    """Parameters whose names match any of `patterns` (fnmatch) train with this lr / decay.

    A parameter joins the first group that matches it; lr 0 freezes the group.
    """

    name: str
    patterns: list[str]
    lr: float
    weight_decay: float = 0.0

    def validate(self) -> None:
        if not self.patterns:
            raise invalid("patterns", f"group {self.name!r} has no pattern; give at least one, e.g. ['*']")
        if self.lr < 0:
            raise invalid("lr", f"must be >= 0 (0 freezes), got {self.lr}")
        if self.weight_decay < 0:
            raise invalid("weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class OptimConfig(Config):
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

    def validate(self) -> None:
        if not self.groups:
            raise invalid("groups", "is empty: add e.g. {name: all, patterns: ['*'], lr: 1.0e-4}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise invalid("groups", f"names must be unique, got {names}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise invalid("betas", f"must lie in [0, 1), got {list(self.betas)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise invalid("warmup_ratio", f"must lie in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise invalid("min_lr_ratio", f"must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainConfig(Config):
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
    # Experts of every MoE layer sharded over groups of this many processes, tokens exchanged by
    # all-to-all (torch back end; it must divide the number of processes and every layer's experts).
    expert_parallel: int = 1
    deepspeed_config: str | None = None  # JSON path; "auto" values filled from this config
    resume: str | None = None  # "auto" (latest checkpoint in output_dir) or a checkpoint path
    num_workers: int = 0
    # Batches of one modality and similar length (LLaVA's group_by_modality_length): less padding
    # when short Q&A and long captions share a stage. Needs a task whose dataset records lengths.
    group_by_modality_length: bool = False
    tensorboard: bool = True
    progress_bar: bool = True
    # torch.compile every transformer block (the torch back end; MoE routing stays eager). On CPU
    # it pays only in long runs: docs/benchmarks.md.
    compile: bool = False

    def validate(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise invalid("max_steps", "set exactly one of max_steps or epochs")
        if self.max_steps is not None and self.max_steps < 1:
            raise invalid("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise invalid("epochs", f"must be > 0, got {self.epochs}")
        for name in ("micro_batch_size", "grad_accum", "log_every", "keep_last", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise invalid(name, f"must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise invalid("grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        if self.expert_parallel < 1:
            raise invalid("expert_parallel", f"must be >= 1, got {self.expert_parallel}")
        if self.expert_parallel > 1 and self.backend != "torch":
            raise invalid("expert_parallel", "needs train.backend=torch (expert parallelism with ZeRO is not "
                                             "implemented; see docs/training.md)")
        if self.compile and self.backend != "torch":
            raise invalid("compile", "applies to train.backend=torch only")
        if self.backend == "deepspeed" and not self.deepspeed_config:
            raise invalid("deepspeed_config", "train.backend=deepspeed needs it (e.g. train/deepspeed/zero2.json)")


@dataclass
class RunConfig:
    """A whole run: which task (and its own config, the recipe section named `task`), how to
    train, how to optimise. Build one from recipe data with `RunConfig.parse`."""

    task: str
    train: TrainConfig
    optim: OptimConfig
    task_config: Any

    @staticmethod
    def parse(data: Any) -> RunConfig:
        from llava_smoe.training.tasks import get_task

        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be a mapping at top level, got {type(data).__name__}")
        task = data.get("task")
        if not isinstance(task, str) or not task:
            raise ConfigError("is missing; name one, e.g. task: toy", ("task",))
        valid = ["optim", "task", "train", task]
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise ConfigError(f"valid top-level keys: {sorted(valid)}", (unknown[0],), unknown=True)
        for required in ("train", "optim"):
            if required not in data:
                raise ConfigError("section is missing", (required,))
        config_cls = get_task(task).config_cls
        return RunConfig(task, parse(TrainConfig, data["train"], ("train",)),
                         parse(OptimConfig, data["optim"], ("optim",)),
                         parse(config_cls, data.get(task) or {}, (task,)))

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, self.task: dump(self.task_config), "train": dump(self.train),
                "optim": dump(self.optim)}
