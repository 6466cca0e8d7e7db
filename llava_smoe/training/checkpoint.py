"""Atomic, self-describing checkpoints.

Layout of `OUTPUT_DIR/checkpoints/step-00000100/`:
    model.safetensors       full weights
    optimizer.pt | deepspeed/   optimizer state (ZeRO shards under DeepSpeed)
    rng/rank-00000.pt       python, numpy and torch RNG states of each rank
    trainer_state.json      step, data position (epoch, index), schedule, run config; written last

Every rank writes into `.tmp-step-00000100/`; rank 0 fsyncs and renames it once all are done.
A crash mid-save leaves only a `.tmp-*` folder, which is never taken for a checkpoint and is
removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llava_smoe.training.distributed import DistInfo, barrier

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0  # data position: the next micro-batch is at `index` in epoch `epoch`'s order
    index: int = 0
    nonfinite: int = 0
    world_size: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    schedule: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`auto` -> the latest checkpoint in output_dir (or None); otherwise a checkpoint folder."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoint_root(output_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a checkpoint folder (no {STATE_FILE} inside)")
    return path


def read_state(ckpt: Path) -> TrainerState:
    with open(ckpt / STATE_FILE) as f:
        return TrainerState(**json.load(f))


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, state: TrainerState, backend: Any, dist_info: DistInfo, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final folder."""
    name = f"step-{state.step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if dist_info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # debris of an earlier crash
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    backend.save(tmp)
    torch.save(capture_rng(), tmp / "rng" / f"rank-{dist_info.rank:05d}.pt")
    barrier()
    if dist_info.is_main:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(asdict(state), f, indent=2)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again after a resume: replace it
            old = root / f".tmp-old-{name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(ckpt: Path, backend: Any) -> TrainerState:
    """Restore weights and optimizer; RNG is restored separately, right before the first step."""
    state = read_state(ckpt)
    backend.load(ckpt)
    return state


def load_rng(ckpt: Path, dist_info: DistInfo) -> None:
    path = ckpt / "rng" / f"rank-{dist_info.rank:05d}.pt"
    restore_rng(torch.load(path, weights_only=False))
