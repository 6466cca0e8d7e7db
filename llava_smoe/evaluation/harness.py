"""`llava-smoe eval`: lmms-eval over one or several checkpoints, local tasks included.

For each checkpoint the `llava_smoe` lmms-eval model is built in-process and handed to
`lmms_eval.evaluator.simple_evaluate`; the local tasks' YAMLs are written into the output
folder pointing at the data actually used, so a run is reproducible from its folder alone.

Layout of `out/`:
    tasks/*.yaml                      the local task definitions this run used
    data/*.parquet                    LLaVA JSON given with --data, exported
    <checkpoint label>/results.json   lmms-eval's results (metrics, configs, versions)
    <checkpoint label>/samples_<task>.jsonl   one line per document: prompt, target, response, score
    summary.json, results.md          every checkpoint side by side
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llava_smoe.config import Config
from llava_smoe.evaluation.questions import (
    check_parquet_columns,
    export_parquet,
    load_questions,
)
from llava_smoe.evaluation.tasks import LOCAL_TASKS, write_task_folder

log = logging.getLogger(__name__)
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


class EvalError(RuntimeError):
    """lmms-eval failed, reported an error, or returned no results for a checkpoint."""


@dataclass
class EvalConfig(Config):
    """One `llava-smoe eval` run. `data` feeds every local task named in `tasks` (LLaVA JSON is
    exported to parquet first); without it local tasks read their default files."""

    checkpoints: list[str]
    tasks: list[str]
    out: str
    data: str | None = None
    image_folder: str | None = None
    limit: int | float | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    max_new_tokens: int = 64
    gen_kwargs: str | None = None  # lmms-eval syntax, overrides tasks: "max_new_tokens=32,temperature=0"
    log_samples: bool = True
    extra_include_paths: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint folder")
        for ckpt in self.checkpoints:
            if not os.path.isfile(os.path.join(ckpt, "config.json")):
                raise FileNotFoundError(
                    f"checkpoint {ckpt} has no config.json: pass a folder written by save_pretrained")
        self.tasks = [t.strip() for t in self.tasks if t.strip()]
        if not self.tasks:
            raise ValueError("--tasks is empty; e.g. --tasks llava_smoe_shapes or --tasks gqa,pope")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks lists a task twice: {self.tasks}")
        if self.data is not None:
            if not self.data.endswith(DATA_SUFFIXES):
                raise ValueError(f"--data {self.data}: expected a LLaVA .json/.jsonl file or a .parquet file")
            if not os.path.isfile(self.data):
                raise FileNotFoundError(f"--data {self.data} does not exist")
            if not self.local_tasks:
                raise ValueError(
                    f"--data is only read by the local tasks {sorted(LOCAL_TASKS)}; none is in --tasks {self.tasks}"
                )
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"--limit must be > 0 (a count, or a fraction below 1), got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")

    @property
    def local_tasks(self) -> list[str]:
        return [t for t in self.tasks if t in LOCAL_TASKS]


def checkpoint_labels(checkpoints: list[str]) -> list[str]:
    """Short unique names for table columns and output folders (folder names, or more of the
    path where two folders share a name)."""
    parts = [os.path.normpath(os.path.abspath(c)).split(os.sep) for c in checkpoints]
    depth = 1
    while depth < max(len(p) for p in parts):
        labels = ["_".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [f"{i}_{'_'.join(p[-1:])}" for i, p in enumerate(parts)]


def prepare_tasks(config: EvalConfig) -> str:
    """Write the local task folder under `out/tasks` (exporting --data when it is LLaVA JSON)."""
    data_files: dict[str, str] = {}
    if config.data is not None:
        path = config.data
        if path.endswith(".parquet"):
            check_parquet_columns(path)
        else:
            stem = os.path.splitext(os.path.basename(path))[0]
            path = export_parquet(load_questions(path, config.image_folder),
                                  os.path.join(config.out, "data", f"{stem}.parquet"))
        data_files = {name: path for name in config.local_tasks}
    else:
        for name in config.local_tasks:
            default = LOCAL_TASKS[name].default_data
            if not os.path.isfile(default):
                raise FileNotFoundError(
                    f"local task {name!r} reads {default} (relative to {os.getcwd()}), which does not exist: pass "
                    "--data FILE (LLaVA JSON or parquet), or export it with "
                    f"`llava-smoe eval --export-parquet {default} --data INSTRUCT.json`"
                )
            data_files[name] = default
    return write_task_folder(os.path.join(config.out, "tasks"), data_files)


def metric_rows(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(task, metric) -> value from lmms-eval's results dict (stderr entries left out)."""
    rows: dict[tuple[str, str], float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            rows[(task, metric if filt in ("", "none") else f"{metric} ({filt})")] = float(value)
    return rows


def markdown_table(per_checkpoint: dict[str, dict[tuple[str, str], float]]) -> str:
    labels = list(per_checkpoint)
    keys = sorted({k for rows in per_checkpoint.values() for k in rows})
    lines = ["| task | metric | " + " | ".join(labels) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in labels) + " |"]
    for task, metric in keys:
        cells = []
        for label in labels:
            value = per_checkpoint[label].get((task, metric))
            cells.append("" if value is None else f"{value:.4f}")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(folder: str, results: dict[str, Any]) -> None:
    from lmms_eval.utils import handle_non_serializable

    os.makedirs(folder, exist_ok=True)
    samples = results.pop("samples", None) or {}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    for task, task_samples in samples.items():
        with open(os.path.join(folder, f"samples_{task}.jsonl"), "w") as f:
            for sample in task_samples:
                record = {k: v for k, v in sample.items() if k != "doc"}  # docs hold decoded images
                f.write(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + "\n")


@contextmanager
def _logged_errors() -> Iterator[list[str]]:
    """Collect what lmms-eval logs at ERROR level: some of its failures are logged, not raised."""
    from loguru import logger

    errors: list[str] = []
    sink = logger.add(lambda message: errors.append(message.record["message"]), level="ERROR", format="{message}")
    try:
        yield errors
    finally:
        logger.remove(sink)


def _evaluate_checkpoint(ckpt: str, lm: Any, config: EvalConfig, task_manager: Any) -> dict[str, Any] | None:
    """lmms-eval's results for one checkpoint (None on ranks other than 0); raises EvalError
    when lmms-eval raises, logs an error, or leaves a requested task without results."""
    from lmms_eval.evaluator import simple_evaluate

    with _logged_errors() as logged:
        try:
            results = simple_evaluate(
                model=lm,
                model_args=f"pretrained={ckpt}",
                tasks=config.tasks,
                limit=config.limit,
                batch_size=config.batch_size,
                gen_kwargs=config.gen_kwargs,
                log_samples=config.log_samples,
                task_manager=task_manager,
                bootstrap_iters=0,
            )
        except Exception as exc:  # noqa: BLE001 - lmms-eval raises anything; report it as one error
            raise EvalError(f"lmms-eval failed on {ckpt}: {type(exc).__name__}: {exc}") from exc
    if logged:
        raise EvalError(f"lmms-eval reported {len(logged)} error(s) on {ckpt}: " + " | ".join(logged))
    if results is None:
        if lm.world_size > 1 and lm.rank != 0:
            return None
        raise EvalError(f"lmms-eval returned no results for {ckpt}")
    found = set(results.get("results", {})) | set(results.get("groups", {}))
    missing = [t for t in config.tasks if t not in found]
    if missing:
        raise EvalError(f"lmms-eval wrote no results for task(s) {missing} on {ckpt}")
    return results


def run_eval(config: EvalConfig) -> dict[str, dict[tuple[str, str], float]]:
    """Evaluate every checkpoint on every task; returns label -> {(task, metric): value}.
    Raises EvalError at the first checkpoint lmms-eval fails on."""
    from lmms_eval.tasks import TaskManager

    from llava_smoe.evaluation.lmms_model import LlavaSmoeLmms
    from llava_smoe.evaluation.lmms_plugin import MODEL_ID

    os.makedirs(config.out, exist_ok=True)
    include = [prepare_tasks(config), *config.extra_include_paths]
    task_manager = TaskManager(include_path=include, model_name=MODEL_ID)
    unknown = [t for t in config.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s) {unknown}; local tasks: {sorted(LOCAL_TASKS)} "
                         "(`lmms-eval --tasks list` lists the built-in ones)")

    per_checkpoint: dict[str, dict[tuple[str, str], float]] = {}
    for ckpt, label in zip(config.checkpoints, checkpoint_labels(config.checkpoints)):
        log.info("evaluating %s on %s", ckpt, ",".join(config.tasks))
        lm = LlavaSmoeLmms(pretrained=ckpt, device=config.device, dtype=config.dtype,
                           batch_size=config.batch_size, max_new_tokens=config.max_new_tokens)
        results = _evaluate_checkpoint(ckpt, lm, config, task_manager)
        if results is None:  # ranks other than 0 under several processes
            continue
        per_checkpoint[label] = metric_rows(results)
        _write_outputs(os.path.join(config.out, label), results)
        del lm

    if per_checkpoint:
        table = markdown_table(per_checkpoint)
        with open(os.path.join(config.out, "results.md"), "w") as f:
            f.write(table)
        summary = {label: {f"{task}/{metric}": v for (task, metric), v in rows.items()}
                   for label, rows in per_checkpoint.items()}
        with open(os.path.join(config.out, "summary.json"), "w") as f:
            json.dump({"checkpoints": dict(zip(checkpoint_labels(config.checkpoints), config.checkpoints)),
                       "tasks": config.tasks, "limit": config.limit, "results": summary}, f, indent=2)
    return per_checkpoint
