"""Compare training runs: one markdown table and a few plots from their `metrics.jsonl`.

A run folder holds `metrics.jsonl` (the trainer's log), `run_config.yaml`, and for `lm` runs
`data.json` (tokens per optimizer step). Tokens are `step * tokens_per_step`; without
`data.json` the step count stands in (the table says so). Perplexity is `exp(validation loss)`.

Outputs in `--out`: `comparison.md`, `summary.json`, `val_loss.png` (validation loss vs
tokens), `load_balance.png` (load coefficient of variation over time) and, when a run uses
ReMoE, `remoe_sparsity.png` (sparsity and the L1 coefficient lambda).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
EVAL_KEY = "eval/loss"
ROUTING = "routing/all/"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class RunSummary:
    name: str
    path: str
    router: str  # "dense" without MoE layers
    num_experts: int | None
    top_k: int | None
    steps: int
    tokens_per_step: int | None
    final_val_loss: float | None
    best_val_loss: float | None
    train_loss: float | None
    tokens_per_s: float | None  # median over log intervals
    load_cv: float | None
    dead_experts: float | None
    sparsity: float | None
    l1_lambda: float | None
    competition_rate: float | None  # mean over the run
    router_agreement: float | None
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict, repr=False)  # key -> [(step, value)]

    @property
    def tokens(self) -> int | None:
        return None if self.tokens_per_step is None else self.steps * self.tokens_per_step

    @property
    def final_ppl(self) -> float | None:
        return _exp(self.final_val_loss)

    @property
    def best_ppl(self) -> float | None:
        return _exp(self.best_val_loss)

    def x(self, step: int) -> float:
        """Tokens seen after `step` optimizer steps (the step itself without data.json)."""
        return step * (self.tokens_per_step or 1)


def _exp(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{n}: a metrics record needs a 'step'")
        records.append(record)
    return records


def load_run(run_dir: str | Path, name: str | None = None) -> RunSummary:
    import yaml

    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE}; is it a training output folder?")
    records = read_metrics(metrics)
    config_path = run_dir / "run_config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    moe = ((config.get(config.get("task", "")) or {}).get("model") or {}).get("moe") if config else None
    data_path = run_dir / "data.json"
    tokens_per_step = json.loads(data_path.read_text()).get("tokens_per_step") if data_path.is_file() else None

    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((int(r["step"]), float(value)))

    def last(key: str) -> float | None:
        return series[key][-1][1] if key in series else None

    def mean(key: str) -> float | None:
        return statistics.fmean(v for _, v in series[key]) if key in series else None

    evals = [v for _, v in series.get(EVAL_KEY, [])]
    return RunSummary(
        name=name or run_dir.name,
        path=str(run_dir),
        router=(moe or {}).get("router", "dense") if moe is not None else ("dense" if config else "?"),
        num_experts=(moe or {}).get("num_experts"),
        top_k=(moe or {}).get("top_k"),
        steps=max((int(r["step"]) for r in records), default=0),
        tokens_per_step=tokens_per_step,
        final_val_loss=evals[-1] if evals else None,
        best_val_loss=min(evals) if evals else None,
        train_loss=last("lm_loss"),
        tokens_per_s=statistics.median(v for _, v in series["tokens_per_s"]) if "tokens_per_s" in series else None,
        load_cv=last(ROUTING + "load_cv"),
        dead_experts=last(ROUTING + "dead_experts"),
        sparsity=last(ROUTING + "sparsity"),
        l1_lambda=last(ROUTING + "l1_lambda"),
        competition_rate=mean(ROUTING + "competition_rate"),
        router_agreement=mean(ROUTING + "router_agreement"),
        series=series,
    )


def _unique_names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in dirs]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _tokens(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def markdown_table(runs: list[RunSummary]) -> str:
    header = ["run", "router", "E", "k", "steps", "tokens", "final val loss", "best val loss", "final ppl",
              "best ppl", "train loss", "tokens/s", "load CV", "dead experts", "ReMoE sparsity", "ReMoE λ",
              "competition rate", "router agreement"]
    rows = [header, ["---"] * len(header)]
    for r in runs:
        rows.append([
            r.name, r.router, _fmt(r.num_experts, "d"), _fmt(r.top_k, "d"), str(r.steps), _tokens(r.tokens),
            _fmt(r.final_val_loss, ".4f"), _fmt(r.best_val_loss, ".4f"), _fmt(r.final_ppl, ".2f"),
            _fmt(r.best_ppl, ".2f"), _fmt(r.train_loss, ".4f"), _fmt(r.tokens_per_s, ",.0f"), _fmt(r.load_cv, ".3f"),
            _fmt(r.dead_experts, ".0f"), _fmt(r.sparsity, ".3f"), _fmt(r.l1_lambda, ".2e"),
            _fmt(r.competition_rate, ".3f"), _fmt(r.router_agreement, ".3f"),
        ])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    notes = ["", "Perplexity = exp(validation loss). Load CV, dead experts, sparsity and λ: the last logged "
             "interval, averaged over MoE layers; competition rate and router agreement: mean over the run."]
    if any(r.tokens_per_step is None for r in runs):
        notes.append("Runs without data.json report no token count; their plots use optimizer steps.")
    return "\n".join(lines + notes) + "\n"


def _plot(runs: list[RunSummary], key: str, out: Path, title: str, ylabel: str, *, log_y: bool = False) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in runs if r.series.get(key)]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for r in drawn:
        points = r.series[key]
        ax.plot([r.x(s) for s, _ in points], [v for _, v in points], marker="o" if len(points) < 20 else None,
                markersize=3, label=r.name)
    ax.set_xlabel("tokens" if all(r.tokens_per_step for r in drawn) else "tokens (or steps without data.json)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def _plot_remoe(runs: list[RunSummary], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in runs if r.series.get(ROUTING + "sparsity")]
    if not drawn:
        return None
    fig, (ax_s, ax_l) = plt.subplots(2, 1, figsize=(6.4, 6.0), dpi=110, sharex=True)
    for r in drawn:
        s = r.series[ROUTING + "sparsity"]
        (line,) = ax_s.plot([r.x(t) for t, _ in s], [v for _, v in s], label=r.name)
        if r.num_experts and r.top_k:
            ax_s.axhline(1 - r.top_k / r.num_experts, color=line.get_color(), linestyle=":", linewidth=1)
        lam = r.series.get(ROUTING + "l1_lambda", [])
        ax_l.plot([r.x(t) for t, _ in lam], [v for _, v in lam], color=line.get_color(), label=r.name)
    ax_s.set_ylabel("sparsity (dotted: 1 - k/E)")
    ax_s.set_title("ReMoE: router sparsity and L1 coefficient")
    ax_l.set_ylabel("lambda")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("tokens" if all(r.tokens_per_step for r in drawn) else "tokens (or steps)")
    for ax in (ax_s, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write the table, a JSON summary and the plots; returns what was written by kind."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("compare: give at least one run folder")
    runs = [load_run(d, name) for d, name in zip(dirs, _unique_names(dirs), strict=True)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"table": out / "comparison.md", "summary": out / "summary.json"}
    written["table"].write_text("# Run comparison\n\n" + markdown_table(runs))
    summary = [{**{k: v for k, v in asdict(r).items() if k != "series"}, "tokens": r.tokens,
                "final_ppl": r.final_ppl, "best_ppl": r.best_ppl} for r in runs]
    written["summary"].write_text(json.dumps(summary, indent=2))
    plots = {
        "val_loss": _plot(runs, EVAL_KEY, out / "val_loss.png", "Validation loss", "validation loss"),
        "load_balance": _plot(runs, ROUTING + "load_cv", out / "load_balance.png",
                              "Load balance (lower is more even)", "coefficient of variation of expert load"),
        "remoe_sparsity": _plot_remoe(runs, out / "remoe_sparsity.png"),
    }
    written.update({k: v for k, v in plots.items() if v is not None})
    return written
