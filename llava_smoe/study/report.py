"""A study's results: `study.json`, `study.md` and PNG plots from its cells' records.

Per variant: mean, standard deviation and 95% interval (Student's t) of every metric; paired
differences against the baseline on the seeds both have, with their interval and a paired
t-test; the cost (training seconds per optimizer step and tokens/s, as measured, and the
per-seed ratio to the baseline; expert evaluations per token; load CV; dead experts). Results
at equal steps (the final values) and, for the spec's `wall_clock_metric` (logged during
training: eval/loss, eval/accuracy), at equal wall-clock: the value each cell had reached when the
fastest variant's mean training time ran out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llava_smoe.study.metrics import value_at_seconds
from llava_smoe.study.spec import StudySpec
from llava_smoe.study.stats import paired_test, summarize

COST = ("seconds_per_step", "tokens_per_s", "expert_evals_per_token", "load_cv", "dead_experts", "tokens", "steps")


def _values(cells: list[dict], variant: str, key: str) -> dict[int, float]:
    return {c["seed"]: c["metrics"][key] for c in cells
            if c["variant"] == variant and c["metrics"].get(key) is not None}


def _paired(mine: dict[int, float], theirs: dict[int, float]) -> dict[str, Any] | None:
    """The paired test of `mine` against `theirs` (per seed) on the seeds both have, or None."""
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    return {**paired_test([mine[s] for s in seeds], [theirs[s] for s in seeds]).to_dict(), "seeds": seeds}


def aggregate(spec: StudySpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    cells = [r for r in records if r and r.get("status") == "done"]
    variants = list(spec.cell_variants)
    under = [f"{c['variant']}/s{c['seed']} ({c['metrics']['tokens']:,} tokens)" for c in cells
             if c["metrics"]["tokens"] < spec.min_tokens]
    report: dict[str, Any] = {
        "name": spec.name, "recipe": spec.recipe, "seeds": spec.seeds, "baseline": spec.baseline,
        "primary": {"name": spec.primary.name, "goal": spec.primary.goal}, "secondary": spec.secondary,
        "min_tokens": spec.min_tokens, "under_budget": under,
        "environment": _environment(cells[0]) if cells else {},
        "environments": _environments(cells),
        "cells": [{"variant": c["variant"], "seed": c["seed"],
                   "metrics": {k: v for k, v in c["metrics"].items() if k != "curve"}} for c in cells],
        "baseline_of": {v: spec.baseline_of(v) for v in variants},
        "variants": {}, "paired": {}, "overhead": {},
    }
    for v in variants:
        base = spec.baseline_of(v)
        stats = {}
        for key in (*spec.metrics, *COST):
            values = list(_values(cells, v, key).values())
            if values:
                stats[key] = summarize(values).to_dict()
        report["variants"][v] = stats
        if v == base:
            continue
        paired = {}
        for key in spec.metrics:
            p = _paired(_values(cells, v, key), _values(cells, base, key))
            if p:
                paired[key] = p
        report["paired"][v] = paired
        mine, theirs = _values(cells, v, "seconds_per_step"), _values(cells, base, "seconds_per_step")
        ratios = [mine[s] / theirs[s] for s in sorted(set(mine) & set(theirs))]
        if ratios:
            report["overhead"][v] = summarize(ratios).to_dict()
    report["equal_wall_clock"] = _equal_wall_clock(spec, cells, variants)
    report["sweep"] = _sweep(spec, cells, report) if spec.sweep else None
    report["verdicts"] = verdicts(report)
    return report


def _sweep(spec: StudySpec, cells: list[dict], report: dict[str, Any]) -> dict[str, Any]:
    """Each variant at its best sweep value (by the primary metric's mean over seeds), and the
    paired difference of each best against the baseline's best. Choosing on the same seeds flatters
    every best alike; the per-value comparisons are the unselected ones."""
    name, goal = spec.primary.name, spec.primary.goal
    means = {v: {label: report["variants"][cv][name]["mean"] for label, cv in spec.swept(v).items()
                 if name in report["variants"][cv]} for v in spec.variants}
    best = {}
    for v, by_label in means.items():
        if by_label:
            label = (min if goal == "min" else max)(by_label, key=by_label.get)
            best[v] = {"value": label, "cell_variant": spec.swept(v)[label], "mean": by_label[label]}
    paired = {}
    if spec.baseline in best:
        theirs = _values(cells, best[spec.baseline]["cell_variant"], name)
        for v, b in best.items():
            p = _paired(_values(cells, b["cell_variant"], name), theirs) if v != spec.baseline else None
            if p:
                paired[v] = p
    # A best at either end of the values may lie beyond them: the sweep has not bracketed it.
    ends = (spec.sweep.labels[0], spec.sweep.labels[-1]) if spec.sweep.ordered else ()
    at_edge = [v for v, b in best.items() if b["value"] in ends]
    return {"key": spec.sweep.key, "values": spec.sweep.labels, "metric": name, "means": means,
            "best": best, "paired_best": paired, "best_at_edge": at_edge}


def _environment(cell: dict) -> dict[str, Any]:
    return {k: v for k, v in cell["provenance"].items() if k != "config"}


def _environments(cells: list[dict]) -> list[dict[str, Any]]:
    """Each distinct environment (code, packages, device) the cells ran in, with its cells: more
    than one when a resumed study was allowed to mix them."""
    groups: dict[str, dict[str, Any]] = {}
    for c in cells:
        env = _environment(c)
        group = groups.setdefault(json.dumps(env, sort_keys=True), {**env, "cells": []})
        group["cells"].append(f"{c['variant']}/s{c['seed']}")
    return list(groups.values())


def _describe_environment(env: dict[str, Any]) -> str:
    code = env.get("code") or {}
    commit = (code.get("commit") or "?")[:12] + (f" + uncommitted {code['uncommitted']}" if code.get("uncommitted") else "")
    return (f"{env.get('device', '?')}, {env.get('cores', '?')} cores; code {commit}; "
            + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v))


def _equal_wall_clock(spec: StudySpec, cells: list[dict], variants: list[str]) -> dict[str, Any] | None:
    """The wall-clock metric of every cell at the fastest variant's mean training time."""
    metric = spec.wall_clock_metric
    curves = {(c["variant"], c["seed"]): [p for p in c["metrics"].get("curve") or [] if metric in p] for c in cells}
    if not any(curves.values()):
        return None
    times = {v: [c["metrics"]["train_seconds"] for c in cells if c["variant"] == v] for v in variants}
    budget = min(sum(t) / len(t) for t in times.values() if t)
    at = {v: {s: value_at_seconds(curves[(v, s)], budget, metric) for (vv, s) in curves if vv == v} for v in variants}
    at = {v: {s: x for s, x in seeds.items() if x is not None} for v, seeds in at.items()}
    seeds_of = {v: sorted(s for (vv, s) in curves if vv == v) for v in variants}
    out: dict[str, Any] = {"metric": metric, "seconds": budget, "variants": {}, "paired": {},
                           "not_reached": [v for v in variants if not at[v]],
                           # a variant some of whose cells had not evaluated by then: its mean is over the others
                           "seeds_not_reached": {v: [s for s in seeds_of[v] if s not in at[v]] for v in variants
                                                 if at[v] and len(at[v]) < len(seeds_of[v])}}
    for v in variants:
        if at[v]:
            out["variants"][v] = summarize(list(at[v].values())).to_dict()
        base = spec.baseline_of(v)
        p = _paired(at[v], at[base]) if v != base else None
        if p:
            out["paired"][v] = p
    return out


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def verdicts(report: dict[str, Any]) -> list[str]:
    """One sentence per variant on the primary metric against the baseline (with a sweep: at the
    same value, then each variant's best against the baseline's best)."""
    name, goal = report["primary"]["name"], report["primary"]["goal"]
    compared = [(v, paired.get(name), report["baseline_of"][v], report["overhead"].get(v))
                for v, paired in report["paired"].items()]
    sweep = report.get("sweep")
    if sweep:
        best = sweep["best"]
        compared += [(f"{v} at its best ({b['cell_variant']})", sweep["paired_best"].get(v),
                      best[report["baseline"]]["cell_variant"] + " (the baseline's best)", None)
                     for v, b in best.items() if v != report["baseline"]]
    out = []
    for v, p, base, cost in compared:
        if p is None:
            continue
        diff = p["mean_diff"]
        better = diff < 0 if goal == "min" else diff > 0
        direction = ("lower" if diff < 0 else "higher") + (" (better)" if better else " (worse)") if diff else "equal"
        cost_text = f" at {cost['mean']:.2f}x its training time per step" if cost else ""
        if p["ci_low"] is None:
            noise = "too few paired seeds for an interval"
        elif p["excludes_zero"]:
            noise = "outside the seed noise"
        else:
            noise = "not outside the seed noise"
        out.append(f"{v}'s {name} is {abs(diff):.4g} {direction} than {base}'s (paired over {p['n']} seeds: "
                   f"95% CI {_fmt(p['ci_low'])} to {_fmt(p['ci_high'])}, p = {_fmt(p['p'], 3)}): {noise}{cost_text}.")
    return out


def markdown(report: dict[str, Any]) -> str:
    name, base = report["primary"]["name"], report["baseline"]
    sweep = report.get("sweep")

    def is_baseline(v: str) -> bool:
        return v == report["baseline_of"][v]

    def diff_text(p: dict[str, Any] | None) -> str:
        return "-" if p is None else f"{p['mean_diff']:+.4f} [{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}], p = {_fmt(p['p'], 3)}"

    vs = f"{base} at the same {sweep['key']}" if sweep else base
    env = report.get("environment", {})
    lines = [f"# Study: {report['name']}", "",
             f"Recipe `{report['recipe']}`, seeds {report['seeds']}, baseline `{base}`, primary metric "
             f"`{name}` ({report['primary']['goal']}), declared before running.",
             f"Machine: {_describe_environment(env)}", ""]
    environments = report.get("environments", [])
    if len(environments) > 1:  # a resumed study allowed to mix: say which cells ran where
        lines += [f"**The cells ran in {len(environments)} environments:**", ""]
        lines += [f"- {_describe_environment(e)}: {', '.join(e['cells'])}" for e in environments] + [""]
    if report["under_budget"]:
        lines += [f"**Under the token budget ({report['min_tokens']:,}):** " + ", ".join(report["under_budget"]), ""]
    metrics = [name, *[m for m in report["secondary"] if m != name]]
    lines += ["## At equal steps", "",
              "| variant | n | " + " | ".join(f"{m} mean (sd) [95% CI]" for m in metrics) + f" | {name}: diff vs {vs} [95% CI], p |",
              "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " | ---: |"]
    for v, stats in report["variants"].items():
        cells = []
        for m in metrics:
            s = stats.get(m)
            cells.append("-" if s is None else f"{_fmt(s['mean'])} ({_fmt(s['sd'])}) [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]")
        p = report["paired"].get(v, {}).get(name)
        diff = "baseline" if is_baseline(v) else diff_text(p)
        n = stats.get(name, {}).get("n", 0)
        lines.append(f"| {v} | {n} | " + " | ".join(cells) + f" | {diff} |")
    lines += ["", "## Cost", "",
              "| variant | train s / step | tokens/s | x baseline s / step [95% CI] | expert evals / token | load CV | dead experts (end) | tokens |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, stats in report["variants"].items():
        def mean(k, digits=4):
            return _fmt(stats[k]["mean"], digits) if k in stats else "-"
        o = report["overhead"].get(v)
        ratio = "1.00" if is_baseline(v) else ("-" if o is None else f"{o['mean']:.2f} [{_fmt(o['ci_low'], 2)}, {_fmt(o['ci_high'], 2)}]")
        lines.append(f"| {v} | {mean('seconds_per_step')} | {mean('tokens_per_s', 0)} | {ratio} | "
                     f"{mean('expert_evals_per_token', 2)} | {mean('load_cv', 3)} | {mean('dead_experts', 1)} | {mean('tokens', 0)} |")
    ewc = report.get("equal_wall_clock")
    if ewc:
        lines += ["", f"## At equal wall-clock ({ewc['metric']} after {ewc['seconds']:.0f} s of training, the fastest "
                      "variant's mean time)", "",
                  f"| variant | n | mean [95% CI] | diff vs {vs} [95% CI], p |", "| --- | ---: | ---: | ---: |"]
        for v, s in ewc["variants"].items():
            p = ewc["paired"].get(v)
            diff = "baseline" if is_baseline(v) else diff_text(p)
            lines.append(f"| {v} | {s['n']} | {_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] | {diff} |")
        if ewc.get("seeds_not_reached"):
            missing = "; ".join(f"{v} s{', s'.join(map(str, seeds))}" for v, seeds in ewc["seeds_not_reached"].items())
            lines += ["", f"Cells with no {ewc['metric']} by then, left out of their variant's mean and of the "
                          f"paired test: {missing}."]
        if ewc.get("not_reached"):
            lines += ["", f"No {ewc['metric']} logged by then for: {', '.join(ewc['not_reached'])} (their cells evaluated "
                          "later: set `train.eval_every` in the recipe for a curve to compare at equal wall-clock)."]
    if sweep:
        labels = sweep["values"]
        lines += ["", f"## The sweep: every variant at each {sweep['key']}", "",
                  (f"{name} mean over seeds at each value, the best per variant in bold, and each variant's best "
                   f"against {base}'s best, paired on the seeds (chosen on these same seeds, which flatters every "
                   "best alike; the tables above compare at equal values)."), "",
                  "| variant | " + " | ".join(labels) + f" | best | best vs {base}'s best [95% CI], p |",
                  "| --- | " + " | ".join("---:" for _ in labels) + " | ---: | ---: |"]
        for v, means in sweep["means"].items():
            b = sweep["best"].get(v, {})
            row = [("**" + _fmt(means[lab]) + "**" if lab == b.get("value") else _fmt(means[lab])) if lab in means else "-"
                   for lab in labels]
            p = sweep["paired_best"].get(v)
            diff = "baseline" if v == base else diff_text(p)
            lines.append(f"| {v} | " + " | ".join(row) + f" | {b.get('value', '-')} | {diff} |")
        if sweep.get("best_at_edge"):
            edge = ", ".join(sweep["best_at_edge"])
            lines += ["", f"**Best at an end of the sweep** (the optimum may lie beyond it): {edge}."]
    lines += ["", "## Verdict on the primary metric", "", *[f"- {v}" for v in report["verdicts"]], ""]
    return "\n".join(lines)


def plots(spec: StudySpec, records: list[dict[str, Any]], report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in records if r and r.get("status") == "done"]
    written = []
    variants = list(spec.cell_variants)
    palette = plt.get_cmap("tab20") if len(variants) > 10 else None
    colors = {v: palette(i % 20) if palette else f"C{i}" for i, v in enumerate(variants)}
    for metric in dict.fromkeys(("eval/loss", "eval/accuracy", spec.wall_clock_metric)):
        by_variant = {v: [[p for p in c["metrics"].get("curve") or [] if metric in p]
                          for c in cells if c["variant"] == v] for v in variants}
        by_variant = {v: [cur for cur in curves if cur] for v, curves in by_variant.items()}
        if not any(by_variant.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, curves in by_variant.items():
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(p["step"] for p in cur) for cur in curves)))
            tokens = [sum(next(p["tokens"] for p in cur if p["step"] == s) for cur in curves) / len(curves) for s in steps]
            values = [[next(p[metric] for p in cur if p["step"] == s) for cur in curves] for s in steps]
            ax.plot(tokens, [sum(x) / len(x) for x in values], color=colors[v], label=f"{v} (n={len(curves)})")
            ax.fill_between(tokens, [min(x) for x in values], [max(x) for x in values], color=colors[v], alpha=0.2)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"{metric} (mean; band: min-max over seeds)")
        ax.legend()
        ax.set_title(f"{spec.name}: {metric} against tokens")
        written.append(_save(fig, out / f"curves_{metric.replace('/', '_')}.png"))
    name = spec.primary.name
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(variants)), 4))
    for i, v in enumerate(variants):
        values = list(_values(cells, v, name).values())
        if not values:
            continue
        ax.scatter([i] * len(values), values, color=colors[v], alpha=0.6, s=18)
        s = summarize(values)
        if s.ci_low is not None:
            ax.errorbar([i + 0.15], [s.mean], yerr=[[s.mean - s.ci_low], [s.ci_high - s.mean]], fmt="o", color="k",
                        capsize=4)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=20)
    ax.set_ylabel(f"final {name} (dots: seeds; bar: mean, 95% CI)")
    ax.set_title(f"{spec.name}: {name}")
    written.append(_save(fig, out / f"final_{name.replace('/', '_')}.png"))
    if spec.sweep:
        written.append(_sweep_plot(spec, cells, out))
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(variants)), 4))
    for i, v in enumerate(variants):
        s = report["variants"][v].get("seconds_per_step")
        if s is None:
            continue
        err = None if s["ci_low"] is None else [[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]]
        ax.bar([i], [s["mean"]], color=colors[v], yerr=err, capsize=4)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=20)
    ax.set_ylabel("training seconds per optimizer step (95% CI)")
    ax.set_title(f"{spec.name}: cost")
    written.append(_save(fig, out / "overhead.png"))
    return written


def _sweep_plot(spec: StudySpec, cells: list[dict], out: Path) -> Path:
    """The primary metric against the swept value, one line per variant (band: min-max over seeds)."""
    import matplotlib.pyplot as plt

    name, labels = spec.primary.name, spec.sweep.labels
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, v in enumerate(spec.variants):
        xs, means, lows, highs = [], [], [], []
        for x, label in enumerate(labels):
            values = list(_values(cells, spec.swept(v)[label], name).values())
            if values:
                xs.append(x)
                means.append(sum(values) / len(values))
                lows.append(min(values))
                highs.append(max(values))
        if xs:
            ax.plot(xs, means, "o-", color=f"C{i % 10}", label=v)
            ax.fill_between(xs, lows, highs, color=f"C{i % 10}", alpha=0.15)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_xlabel(spec.sweep.key)
    ax.set_ylabel(f"final {name} (mean; band: min-max over seeds)")
    ax.legend()
    ax.set_title(f"{spec.name}: {name} against {spec.sweep.key}")
    return _save(fig, out / f"sweep_{name.replace('/', '_')}.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(spec: StudySpec, records: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    report = aggregate(spec, records)
    (out / "study.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "study.md").write_text(markdown(report))
    report["plots"] = [str(p) for p in plots(spec, records, report, out)]
    return report
