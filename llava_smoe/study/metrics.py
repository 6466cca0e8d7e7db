"""What one cell measured, read from its training log (`metrics.jsonl`) and its evaluation.

Training time is the sum of the log's `interval_s` (evaluation and saving excluded), tokens are
`tokens_per_s * interval_s` summed; routing statistics are averaged over the log records (the
load CV, competition rate and expert evaluations per token), except dead experts, taken at the
end of training. `curve` keeps (step, tokens, seconds, and every eval/ metric logged: eval/loss,
eval/accuracy ...) for plots and for comparisons at equal wall-clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CURVE_PREFIX, NOT_CURVES = "eval/", "eval/skipped/"  # eval/loss, eval/accuracy (vlm.eval_accuracy), ...
ROUTING_AVERAGED = ("load_cv", "expert_evals_per_token", "competition_rate", "router_agreement", "sparsity")


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the cell has not trained")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell_metrics(run_dir: Path, eval_file: Path | None = None) -> dict[str, Any]:
    records = read_log(run_dir)
    train = [r for r in records if "loss" in r and "interval_s" in r]
    if not train:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no training record")
    seconds = tokens = 0.0
    elapsed_at: dict[int, tuple[float, float]] = {}  # step -> (tokens, seconds) at the end of that step
    for r in train:
        seconds += r["interval_s"]
        tokens += r["tokens_per_s"] * r["interval_s"]
        elapsed_at[r["step"]] = (tokens, seconds)
    steps = train[-1]["step"]
    out: dict[str, Any] = {
        "steps": steps,
        "tokens": round(tokens),
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "train/loss": train[-1]["loss"],
    }
    for key in ROUTING_AVERAGED:
        values = [r[f"routing/all/{key}"] for r in train if f"routing/all/{key}" in r]
        if values:
            out[key] = sum(values) / len(values)
    if "routing/all/dead_experts" in train[-1]:
        out["dead_experts"] = train[-1]["routing/all/dead_experts"]
    curve = []
    for r in records:
        if "eval/loss" in r:
            done = max((s for s in elapsed_at if s <= r["step"]), default=None)
            tok, sec = elapsed_at[done] if done is not None else (0.0, 0.0)
            evals = {k: v for k, v in r.items() if k.startswith(CURVE_PREFIX) and not k.startswith(NOT_CURVES)}
            curve.append({"step": r["step"], "tokens": tok, "seconds": sec, **evals})
    if curve:
        out.update({k: v for k, v in curve[-1].items() if k.startswith(CURVE_PREFIX)})
    out["curve"] = curve
    if eval_file is not None and eval_file.is_file():
        ev = json.loads(eval_file.read_text())
        out["accuracy"], out["blind_accuracy"] = ev["accuracy"], ev["blind_accuracy"]
        out.update({f"accuracy/{t}": v for t, v in ev["accuracy_by_type"].items()})
        out.update({f"blind_accuracy/{t}": v for t, v in ev["blind_accuracy_by_type"].items()})
    return out


def value_at_seconds(curve: list[dict[str, Any]], seconds: float, key: str = "eval/loss") -> float | None:
    """The metric at a training time, linearly interpolated between evaluation points (the last
    one past the end); None before the first."""
    points = [(p["seconds"], p[key]) for p in curve if key in p]
    if not points or seconds < points[0][0]:
        return None
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= seconds <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (seconds - s0) / (s1 - s0)
    return points[-1][1]
