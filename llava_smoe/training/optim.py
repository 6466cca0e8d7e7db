"""Parameter groups from name patterns, AdamW, and a warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from llava_smoe.config import ConfigError
from llava_smoe.training.config import OptimConfig

log = logging.getLogger(__name__)


@dataclass
class GroupSummary:
    name: str
    tensors: int
    parameters: int
    lr: float


def build_param_groups(model: nn.Module, config: OptimConfig) -> tuple[list[dict], list[GroupSummary], int]:
    """Assign each trainable parameter to the first group whose pattern matches its name.

    Parameters the model already froze (e.g. a vision tower with `freeze: true`) stay frozen:
    a group never re-enables them, and a group with lr > 0 that matches only such parameters is
    an error (the recipe contradicts the model config). Parameters matching no group, or a group
    with lr 0, are frozen too (requires_grad=False).
    Returns (torch param groups, per-group summary, number of frozen parameters).
    """
    members: dict[str, list[tuple[str, nn.Parameter]]] = {g.name: [] for g in config.groups}
    model_frozen: dict[str, list[str]] = {g.name: [] for g in config.groups}
    frozen: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        group = next((g for g in config.groups if any(fnmatch.fnmatchcase(name, p) for p in g.patterns)), None)
        if group is None or group.lr == 0:
            frozen.append((name, param))
        elif not param.requires_grad:
            model_frozen[group.name].append(name)
            frozen.append((name, param))
        else:
            members[group.name].append((name, param))
    names = [n for n, _ in model.named_parameters()]
    for g in config.groups:
        if g.lr > 0 and not members[g.name]:
            if model_frozen[g.name]:
                raise ConfigError(
                    f"optim group {g.name!r}: its {len(model_frozen[g.name])} parameters (e.g. "
                    f"{model_frozen[g.name][0]}) are frozen by the model config (e.g. vision freeze: true); "
                    "unfreeze them there or drop the group"
                )
            sample = ", ".join(names[:8])
            raise ConfigError(
                f"optim group {g.name!r}: patterns {g.patterns} match no parameter "
                f"(or all were taken by an earlier group); names look like: {sample}, ..."
            )
        if model_frozen[g.name]:
            log.info("optim group %r: %d tensors frozen by the model config stay frozen", g.name, len(model_frozen[g.name]))
    for _, param in frozen:
        param.requires_grad_(False)
    groups, summary = [], []
    for g in config.groups:
        params = [p for _, p in members[g.name]]
        if params:
            groups.append(
                {"name": g.name, "params": params, "lr": g.lr, "base_lr": g.lr, "weight_decay": g.weight_decay}
            )
        summary.append(GroupSummary(g.name, len(params), sum(p.numel() for p in params), g.lr))
    if not groups:
        raise ConfigError("optim.groups: no trainable parameter (every group has lr 0 or matches nothing)")
    return groups, summary, sum(p.numel() for _, p in frozen)


def build_optimizer(groups: list[dict], config: OptimConfig) -> torch.optim.Optimizer:
    fused = config.fused
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=config.betas, eps=config.eps, fused=fused)


class WarmupCosineSchedule:
    """lr(step) = base_lr * factor(step): linear warm-up, then cosine (or constant) decay.

    Stateless apart from its shape, so a resumed run only needs the step; the lr is written
    into the optimizer's groups before each step (works the same under DeepSpeed).
    """

    def __init__(self, total_steps: int, warmup_ratio: float, kind: str = "cosine", min_lr_ratio: float = 0.0):
        self.total_steps = total_steps
        self.warmup_steps = math.ceil(warmup_ratio * total_steps)
        self.kind = kind
        self.min_lr_ratio = min_lr_ratio

    def factor(self, step: int) -> float:
        """Factor for the optimizer step with 0-based index `step`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def apply(self, param_groups: list[dict], step: int) -> dict[str, float]:
        f = self.factor(step)
        lrs = {}
        for group in param_groups:
            group["lr"] = group["base_lr"] * f
            lrs[group["name"]] = group["lr"]
        return lrs

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "kind": self.kind,
                "min_lr_ratio": self.min_lr_ratio}

    def check_matches(self, state: dict) -> None:
        if state != self.state_dict():
            raise ConfigError(
                f"the checkpoint's schedule {state} differs from this run's {self.state_dict()}; "
                "resume with the same max_steps/epochs, warmup_ratio and schedule"
            )
