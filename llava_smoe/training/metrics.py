"""Rank-0 side effects of logging: metrics.jsonl, TensorBoard, and the progress bar."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def flatten_routing(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """{'layers.0.ffn': {'load_cv': 0.1, 'load': [..]}} -> {'routing/layers.0.ffn/load_cv': 0.1, ...}"""
    out: dict[str, float] = {}
    for layer, values in stats.items():
        for key, value in values.items():
            if hasattr(value, "tolist"):
                value = value.tolist()
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, (int, float)):
                out[f"routing/{layer}/{key}"] = float(value)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
                out.update({f"routing/{layer}/{key}/{i}": float(v) for i, v in enumerate(value)})
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records written after the checkpoint so the file reads as one run."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger whose calls do nothing."""

    def __init__(self, output_dir: Path, *, enabled: bool, total_steps: int, initial_step: int,
                 tensorboard: bool, progress_bar: bool):
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(output_dir / METRICS_FILE, "a")  # noqa: SIM115 (open for the run; close() closes it)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=initial_step + 1)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        for handle in (self.bar, self.writer, self.file):
            if handle is not None:
                handle.close()
