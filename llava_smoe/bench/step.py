"""Where a training step's time goes: one stage's optimizer steps, broken down, for several
variants of its recipe measured round-robin in one process, as ratios against the first.

Each run builds the stage afresh (the trainer, the model, the data), trains `warmup` untimed
steps, then `steps` timed ones; the trainer's phase timer splits each step into data (batches
and moving them), forward, aux (collecting the MoE losses), backward, sync (gradient norm and
the step's one host sync), optimizer, moe_step (per-step router state) and log. Evaluation and
checkpoints are off. Runs rotate their order every round, so a noisy moment hits every variant.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llava_smoe import allocator
from llava_smoe.config import Config, invalid

PHASES = ("data", "forward", "aux", "backward", "sync", "optimizer", "moe_step", "log")


@dataclass
class StepBenchConfig(Config):
    recipe: str
    variants: dict[str, list[str]]  # name -> overrides on top of `overrides`; the first is the baseline
    overrides: list[str] = field(default_factory=list)
    steps: int = 60
    warmup: int = 10
    repeats: int = 3

    def validate(self) -> None:
        if not self.variants:
            raise invalid("variants", "name at least one")
        for name in ("steps", "repeats"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be >= 1, got {getattr(self, name)}")
        if self.warmup < 1:
            raise invalid("warmup", "must be >= 1 (the first step's timer starts at the end of a step)")


def _run(config: StepBenchConfig, overrides: list[str], out: Path, profile: Path | None = None) -> dict[str, float]:
    from llava_smoe.training import distributed
    from llava_smoe.training.recipe import load_recipe
    from llava_smoe.training.tasks import get_task
    from llava_smoe.training.trainer import PhaseTimes, Trainer, seed_everything

    run = load_recipe(config.recipe, [*config.overrides, *overrides, f"train.output_dir={out}",
                                      f"train.max_steps={config.warmup + config.steps}", "train.save_every=0",
                                      "train.eval_every=0", f"train.log_every={config.warmup + config.steps}",
                                      "train.progress_bar=false", "train.tensorboard=false"])
    dist_info = distributed.setup(run.train.backend)
    seed_everything(run.train.seed)
    parts = get_task(run.task).build(run)
    parts.eval_dataset = None  # no evaluation at the end either
    parts.export_fn = None
    trainer = Trainer(run, parts, dist_info)
    trainer.phases = PhaseTimes(skip_steps=config.warmup)
    if profile is None:
        trainer.fit()
    else:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit()
        profile.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    times = trainer.phases
    return {name: 1e3 * times.seconds.get(name, 0.0) / times.steps for name in ("step", *PHASES)}


def run_step_bench(config: StepBenchConfig, profile: Path | None = None) -> list[dict[str, Any]]:
    """One row per variant: median ms per step and per phase over the rounds, and the median of
    the per-round ratios to the first variant."""
    names = list(config.variants)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(config.repeats):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                out = Path(tmp) / f"{name}-{r}"
                runs[name].append(_run(config, config.variants[name], out,
                                       profile if (profile is not None and name == names[0] and r == 0) else None))
    base = names[0]
    rows = []
    for name in names:
        row: dict[str, Any] = {"variant": name, "overrides": config.variants[name], "baseline": base,
                               "steps": config.steps, "repeats": config.repeats, "threads": torch.get_num_threads(),
                               "malloc": allocator.mode(), "torch": torch.__version__}
        for phase in ("step", *PHASES):
            row[f"ms_{phase}"] = statistics.median(run[phase] for run in runs[name])
        row["ms_step_min"] = min(run["step"] for run in runs[name])
        row["ms_step_max"] = max(run["step"] for run in runs[name])
        row["ratio_to_baseline"] = statistics.median(a["step"] / b["step"] for a, b in zip(runs[name], runs[base]))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | ms / step (median, min-max) | x " + rows[0]["baseline"] + " | "
             + " | ".join(PHASES) + " |", "|---|---:|---:|" + "---:|" * len(PHASES)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_step']:.1f} ({r['ms_step_min']:.1f}-{r['ms_step_max']:.1f}) | "
                     f"{r['ratio_to_baseline']:.2f} | " + " | ".join(f"{r[f'ms_{p}']:.1f}" for p in PHASES) + " |")
    return "\n".join(lines)
