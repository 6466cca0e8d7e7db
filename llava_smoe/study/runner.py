"""Running a study: every (variant, seed) cell, resumably, each with its provenance.

Layout of the study folder:
    study.yaml                         the spec as run
    shared/s{seed}/{stage}/            stages every cell of a seed starts from
    cells/{variant}/s{seed}/run/       the cell's training folder (metrics.jsonl, checkpoints, final)
    cells/{variant}/s{seed}/eval.json  exact-match results, when the spec evaluates
    cells/{variant}/s{seed}/cell.json  status, provenance, metrics
    cells/{variant}/s{seed}/log.txt    what the cell's processes printed

Cells run as `llava-smoe train` subprocesses (with `train.resume=auto`, so a killed cell goes on
from its last checkpoint), one after another or on `workers` at once, each with cores / workers
threads. A finished cell is skipped when the study runs again, after its provenance (code,
resolved config, package versions, device) is compared with what running it now would record:
a difference stops the study, naming it, unless mixing is allowed. A finished shared stage is
reused only when the settings it ran with (its `run_config.yaml`, or a data stage's manifest) are
the ones the spec gives it now, paths under its own shared folder aside, so a copy from another
study serves and an edited stage is not silently kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_smoe.config import ConfigError, dump
from llava_smoe.study.metrics import cell_metrics, read_log
from llava_smoe.study.spec import LOSS_TAIL, StageSpec, StudySpec

CELL_FILE = "cell.json"
PACKAGES = ("torch", "transformers", "deepspeed", "tokenizers", "numpy", "llava-smoe")
REPO = Path(__file__).resolve().parents[2]
# Settings the runner adds for its own bookkeeping: where and how often a stage saves, not what it computes.
BOOKKEEPING = ("train.output_dir", "train.resume", "train.save_every", "train.progress_bar", "train.tensorboard")


class StudyError(RuntimeError):
    """A study that cannot go on (mixed provenance, a failed cell, a cell under its token budget)."""


@dataclass
class Cell:
    variant: str
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.variant}/s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"

    def record(self) -> dict[str, Any] | None:
        path = self.folder / CELL_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def write(self, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{CELL_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.folder / CELL_FILE)  # a killed write never leaves half a record


# -- provenance ---------------------------------------------------------------------------------------
def code_identity() -> dict[str, Any]:
    """The git commit, and a hash of uncommitted changes (tracked files) when there are any."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD").strip() or None
    diff = git("diff", "HEAD", "--", "llava_smoe", "train", "pyproject.toml")
    return {"commit": commit, "uncommitted": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None}


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    import torch

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = f"cpu: {_cpu_model()}"
    return {"versions": versions, "device": device, "machine": platform.machine(), "cores": os.cpu_count()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def differences(recorded: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two provenance records."""
    out = []
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, where + ".")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):  # dotted as overrides index lists
            out += differences(dict(enumerate(a)), dict(enumerate(b)), where + ".")
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")
    return out


def relocated(value: Any, old: str, new: str) -> Any:
    """`value` with every path at or under `old` moved under `new`."""
    if isinstance(value, dict):
        return {k: relocated(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


# -- the study ----------------------------------------------------------------------------------------
class Study:
    def __init__(self, spec: StudySpec, spec_dir: Path, out: Path, *, workers: int = 1,
                 threads: int | None = None, allow_mixed: bool = False, log=print):
        self.spec, self.spec_dir, self.out = spec, spec_dir, out
        self.workers = workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.allow_mixed = allow_mixed
        self.log = log
        self._lock = threading.Lock()
        # Seed-major: a study stopped part way has every variant at the same seeds.
        self.cells = [Cell(v, s, out / "cells" / v / f"s{s}") for s in spec.seeds for v in spec.cell_variants]

    # -- commands ----------------------------------------------------------------------------------
    def _placeholders(self, seed: int, cell: Path | None = None) -> dict[str, Any]:
        from llava_smoe.data.synth import parse_world

        worlds = {s.name: parse_world({**s.synth, "seed": seed}, ("shared", s.name, "synth"))
                  for s in self.spec.shared if s.synth is not None}
        return {"seed": str(seed), "study": str(self.out), "shared": str(self.out / "shared" / f"s{seed}"),
                "cell": str(cell or ""), **worlds}

    def _expand(self, items: list[str], values: dict[str, Any], where: str) -> list[str]:
        try:
            return [item.format(**values) for item in items]
        except (KeyError, IndexError) as exc:
            raise ConfigError(f"unknown placeholder {exc} (use {sorted(values)})", (where,)) from None
        except AttributeError as exc:
            raise ConfigError(f"unknown placeholder field: {exc}", (where,)) from None

    def _recipe(self, path: str) -> Path:
        recipe = (self.spec_dir / path).resolve()
        if not recipe.is_file():
            raise ConfigError(f"{recipe} does not exist", ("recipe",))
        return recipe

    def cell_overrides(self, cell: Cell) -> list[str]:
        values = self._placeholders(cell.seed, cell.folder)
        return [*self._expand(self.spec.overrides, values, "overrides"),
                *self._expand(self.spec.cell_variants[cell.variant], values, f"variants.{cell.variant.partition('@')[0]}"),
                f"train.seed={cell.seed}", f"train.output_dir={cell.run_dir}", "train.resume=auto",
                f"train.save_every={self.spec.save_every}", "train.progress_bar=false", "train.tensorboard=false"]

    def resolved_config(self, cell: Cell) -> dict[str, Any]:
        from llava_smoe.training.recipe import load_recipe

        try:
            return load_recipe(self._recipe(self.spec.recipe), self.cell_overrides(cell)).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"cell {cell.key}: {exc}") from None

    def provenance(self, cell: Cell, env: dict[str, Any]) -> dict[str, Any]:
        return {"code": code_identity(), "config": self.resolved_config(cell), **env}

    # -- running -------------------------------------------------------------------------------------
    def _subprocess(self, args: list[str], log_file: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as log:
            log.write(f"$ {' '.join(args)}\n")
            log.flush()
            proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if proc.returncode != 0:
            tail = log_file.read_text().splitlines()[-5:]
            raise StudyError(f"`{' '.join(args[:6])} ...` failed ({proc.returncode}); {log_file}: " + " | ".join(tail))

    def _train(self, recipe: Path, overrides: list[str], log_file: Path) -> None:
        self._subprocess([sys.executable, "-m", "llava_smoe.cli", "train", str(recipe), *overrides], log_file)

    def run_shared(self, seed: int) -> None:
        shared = self.out / "shared" / f"s{seed}"
        for stage in self.spec.shared:
            folder = shared / stage.name
            if not self._finished(folder):
                self.log(f"shared s{seed}/{stage.name}")
                self._run_stage(stage, seed, folder, shared / f"{stage.name}.log.txt")
            if stage.max_loss is not None:
                check_final_loss(stage, seed, folder)

    def _run_stage(self, stage: StageSpec, seed: int, folder: Path, log_file: Path) -> None:
        if stage.synth is not None:
            config = json.dumps({**stage.synth, "seed": seed})
            self._subprocess([sys.executable, "-m", "llava_smoe.study.synth", config, str(folder)], log_file)
            return
        self._train(self._recipe(stage.recipe), self.stage_overrides(stage, seed), log_file)

    def stage_overrides(self, stage: StageSpec, seed: int) -> list[str]:
        folder = self.out / "shared" / f"s{seed}" / stage.name
        return [*self._expand(stage.overrides, self._placeholders(seed), f"shared.{stage.name}.overrides"),
                f"train.seed={seed}", f"train.output_dir={folder}", "train.resume=auto",
                f"train.save_every={self.spec.save_every}", "train.progress_bar=false", "train.tensorboard=false"]

    def check_shared(self, seed: int) -> None:
        """Every shared stage of `seed` validates (the generator's settings, or the whole recipe),
        and a finished one ran with them."""
        for stage in self.spec.shared:
            try:
                settings = self.stage_settings(stage, seed)
            except ConfigError as exc:
                raise ConfigError(f"shared stage {stage.name} (seed {seed}): {exc}") from None
            self.check_reused(stage, seed, settings)

    def stage_settings(self, stage: StageSpec, seed: int) -> dict[str, Any]:
        """What running a shared stage now would use: the generator's settings, or the resolved recipe."""
        from llava_smoe.data.synth import parse_world
        from llava_smoe.training.recipe import load_recipe

        if stage.synth is not None:
            return dump(parse_world({**stage.synth, "seed": seed}, ("synth",)))
        return load_recipe(self._recipe(stage.recipe), self.stage_overrides(stage, seed)).to_dict()

    def check_reused(self, stage: StageSpec, seed: int, settings: dict[str, Any]) -> None:
        """A finished shared stage must have run with `settings`, what the spec gives it now (its paths
        read as under this study's shared folder, wherever it ran), or the study stops, naming the
        differences, unless mixing is allowed."""
        from llava_smoe.training.recipe import load_recipe

        folder = self.out / "shared" / f"s{seed}" / stage.name
        if not self._finished(folder):
            return
        where = f"shared stage {stage.name} (seed {seed}) in {folder}"
        record = folder / ("manifest.json" if stage.synth is not None else "run_config.yaml")
        if not record.is_file():
            problem = f"{where} is finished but has no {record.name} to tell what settings it ran with"
        else:
            try:
                if stage.synth is not None:
                    recorded = json.loads(record.read_text())["config"]
                else:
                    recorded = load_recipe(record).to_dict()  # read as today's code reads it: defaults filled in
                    ran_in = str(Path(recorded["train"]["output_dir"]).parent)
                    recorded = relocated(recorded, ran_in, str(folder.parent))
            except (ConfigError, KeyError, ValueError) as exc:
                problem = f"{where}: its {record.name} cannot be read as settings ({exc})"
            else:
                diff = [d for d in differences(recorded, settings) if not d.startswith(BOOKKEEPING)]
                if not diff:
                    return
                problem = (f"{where} ran with other settings than the spec gives it: " + "; ".join(diff[:4])
                           + (f"; ... ({len(diff)} in all)" if len(diff) > 4 else ""))
        if not self.allow_mixed:
            raise StudyError(problem + f" -- delete {folder} to run it again, or pass --allow-mixed")
        self.log(f"warning: reusing {problem}")

    @staticmethod
    def _finished(folder: Path) -> bool:
        return (folder / "manifest.json").is_file() or (folder / "final").is_dir()

    def run_cell(self, cell: Cell, env: dict[str, Any]) -> dict[str, Any]:
        provenance = self.provenance(cell, env)
        cell.write({"variant": cell.variant, "seed": cell.seed, "status": "running", "provenance": provenance,
                    "started": time.time()})
        self.log(f"cell {cell.key}: training")
        log_file = cell.folder / "log.txt"
        self._train(self._recipe(self.spec.recipe), self.cell_overrides(cell), log_file)
        if self.spec.evaluate is not None:
            self.log(f"cell {cell.key}: evaluating")
            values = self._placeholders(cell.seed, cell.folder)
            ev = self.spec.evaluate
            self._subprocess([sys.executable, "-m", "llava_smoe.study.evaluate", str(cell.run_dir / "final"),
                              ev.data.format(**values), ev.image_folder.format(**values),
                              str(cell.folder / "eval.json"), str(ev.batch_size)], log_file)

        metrics = cell_metrics(cell.run_dir, cell.folder / "eval.json")
        record = {"variant": cell.variant, "seed": cell.seed, "status": "done", "provenance": provenance,
                  "metrics": metrics, "finished": time.time()}
        cell.write(record)
        self.log(f"cell {cell.key}: done ({metrics.get(self.spec.primary.name)})")
        return record

    def check_provenance(self, env: dict[str, Any]) -> None:
        """Recorded cells (finished or interrupted) must match what running them now records."""
        mixed = []
        for cell in self.cells:
            record = cell.record()
            if record is None:
                continue
            diff = differences(record["provenance"], self.provenance(cell, env))
            if diff:
                mixed.append(f"{cell.key}: " + "; ".join(diff[:4]) + (f"; ... ({len(diff)} in all)" if len(diff) > 4 else ""))
        if mixed and not self.allow_mixed:
            raise StudyError("cells already run differ from this run (code, settings, packages or device): "
                             + " || ".join(mixed) + " -- rerun them in a new study folder, or pass --allow-mixed")
        for line in mixed:
            self.log(f"warning: mixing provenance: {line}")

    def run(self) -> list[dict[str, Any]]:
        """Run what is not done yet; return every cell's record."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "study.yaml").write_text(yaml_dump(dump(self.spec)))
        env = environment()
        self.check_provenance(env)
        todo = [c for c in self.cells if (c.record() or {}).get("status") != "done"]
        self.log(f"study {self.spec.name}: {len(self.cells)} cells, {len(self.cells) - len(todo)} done, "
                 f"{len(todo)} to run on {self.workers} worker(s) x {self.threads} thread(s)")
        seeds = sorted({c.seed for c in todo})
        for seed in seeds:  # a bad shared stage stops the study before anything runs
            self.check_shared(seed)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            # The pool starts jobs in submission order: every seed's shared stages start before any
            # cell, so a seed's cells run as soon as its own stages are done (not after every
            # seed's), and a cell waits only on stages already running.
            shared = {seed: pool.submit(self._try, self.run_shared, seed) for seed in seeds}
            runs = [(cell, pool.submit(self._cell_after, shared[cell.seed], cell, env)) for cell in todo]
            failures = [f"shared s{seed}: {job.result()}" for seed, job in shared.items() if job.result()]
            failures += [f"{cell.key}: {job.result()}" for cell, job in runs if job.result()]
        if failures:
            raise StudyError(f"{len(failures)} part(s) failed: " + " || ".join(failures))
        return [c.record() for c in self.cells]

    def _cell_after(self, shared: Future, cell: Cell, env: dict[str, Any]) -> str | None:
        if shared.result():
            return None  # its seed's shared stages failed: reported once, under the seed
        return self._try(self.run_cell, cell, env)

    @staticmethod
    def _try(fn, *args) -> str | None:
        try:
            fn(*args)
        except (StudyError, ConfigError) as exc:
            return str(exc)
        return None


def check_final_loss(stage: StageSpec, seed: int, folder: Path) -> float:
    """A shared stage's final loss (mean of its last LOSS_TAIL logged values), or a StudyError
    when it is above the stage's `max_loss` or was never logged."""
    where = f"shared stage {stage.name} (seed {seed})"
    try:
        losses = [r["loss"] for r in read_log(folder) if "loss" in r]
    except FileNotFoundError:
        losses = []
    if not losses:
        raise StudyError(f"{where}: no training loss in {folder / 'metrics.jsonl'} to check against "
                         f"max_loss {stage.max_loss}")
    tail = losses[-LOSS_TAIL:]
    final = sum(tail) / len(tail)
    if final > stage.max_loss:
        raise StudyError(f"{where} ended at loss {final:.4f} (mean of its last {len(tail)} logged), above its "
                         f"max_loss {stage.max_loss}: its seed's cells were not run. Give the stage more steps or "
                         f"other settings and delete {folder} to run it again")
    return final


def yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
