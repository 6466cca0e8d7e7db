"""`llava-smoe study`: a 2 x 2 grid of tiny toy runs, killed and resumed; statistics by hand."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llava_smoe.study.stats import paired_test, summarize, t_cdf, t_ppf

ROOT = Path(__file__).resolve().parents[1]
T975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105}  # Student's t, two-sided 95%, from tables


def test_t_distribution_matches_the_tables():
    for df, q in T975.items():
        assert t_ppf(0.975, df) == pytest.approx(q, rel=1e-8)
    assert t_cdf(2.0, 3) == pytest.approx(0.930337, abs=1e-6)
    assert t_cdf(0.0, 5) == pytest.approx(0.5)


def test_summary_and_paired_test_equal_a_hand_computation():
    baseline, variant = [1.0, 2.0, 3.0], [0.5, 1.8, 2.4]
    s = summarize(variant)
    mean = (0.5 + 1.8 + 2.4) / 3
    sd = math.sqrt(((0.5 - mean) ** 2 + (1.8 - mean) ** 2 + (2.4 - mean) ** 2) / 2)
    assert (s.n, s.mean, s.sd) == (3, pytest.approx(mean), pytest.approx(sd))
    assert s.ci_low == pytest.approx(mean - T975[2] * sd / math.sqrt(3))
    assert s.ci_high == pytest.approx(mean + T975[2] * sd / math.sqrt(3))
    p = paired_test(variant, baseline)
    d = [-0.5, -0.2, -0.6]
    d_mean = sum(d) / 3
    d_sd = math.sqrt(sum((x - d_mean) ** 2 for x in d) / 2)
    assert p.mean_diff == pytest.approx(d_mean) and p.sd == pytest.approx(d_sd)
    assert p.ci_low == pytest.approx(d_mean - T975[2] * d_sd / math.sqrt(3))
    assert p.t == pytest.approx(d_mean / (d_sd / math.sqrt(3)))
    # t = -3.606 with 2 degrees of freedom: two-sided p = 0.0691 (from the t table's CDF).
    assert p.p == pytest.approx(0.06905, abs=1e-4) and not p.excludes_zero


TOY = {
    "task": "toy",
    "toy": {"num_train": 64, "num_eval": 16, "hidden_size": 16, "num_heads": 2, "seq_len": 8, "dropout": 0.0},
    "train": {"output_dir": "unused", "max_steps": 40, "micro_batch_size": 8, "precision": "fp32", "log_every": 2,
              "eval_every": 8},
    "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": 1.0e-2}], "warmup_ratio": 0.0},
}


def write_spec(tmp_path: Path, variants: dict | None = None) -> Path:
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(TOY))
    spec = {
        "name": "toy-grid", "recipe": "toy.yaml", "seeds": [0, 1], "baseline": "smoe",
        "variants": variants or {"smoe": ["toy.moe.router=smoe"], "competesmoe": [
            "toy.moe.router=competesmoe", "toy.moe.router_options.warmup_fraction=0.0",
            "toy.moe.router_options.competition_prob=0.5"]},
        "primary": {"name": "eval/loss", "goal": "min"}, "secondary": ["train/loss"],
        "save_every": 4, "min_tokens": 1000,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # variants run in the order written
    return path


def study(spec: Path, out: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_smoe.cli", "study", str(spec), "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_study_runs_every_cell_resumes_a_killed_one_and_reports(tmp_path):
    spec, out = write_spec(tmp_path), tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last = out / "cells" / "competesmoe" / "s1"
    proc = subprocess.Popen([sys.executable, "-m", "llava_smoe.cli", "study", str(spec), "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 500
    while not (last / "run" / "checkpoints" / "step-00000004").is_dir():  # the last cell has saved once
        assert proc.poll() is None and time.time() < deadline, "the study ended before the last cell saved"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    records = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())
               for p in (out / "cells").glob("*/*/cell.json")}
    assert [k for k, r in sorted(records.items()) if r["status"] == "done"] == ["competesmoe/s0", "smoe/s0", "smoe/s1"]
    assert records["competesmoe/s1"]["status"] == "running"
    finished = {k: (out / "cells" / k / "cell.json").stat().st_mtime_ns for k in ("smoe/s0", "smoe/s1")}

    again = study(spec, out, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "3 done, 1 to run" in again.stdout
    assert {k: (out / "cells" / k / "cell.json").stat().st_mtime_ns for k in finished} == finished  # skipped
    assert "resumed from" in (last / "log.txt").read_text()
    resumed = json.loads((last / "cell.json").read_text())["metrics"]

    # The resumed cell equals the same cell trained without interruption.
    from llava_smoe.study.runner import Study
    from llava_smoe.study.spec import load_spec

    loaded, spec_dir = load_spec(spec)
    cell = next(c for c in Study(loaded, spec_dir, out).cells if c.key == "competesmoe/s1")
    ref_dir = tmp_path / "reference"
    overrides = [o if not o.startswith("train.output_dir=") else f"train.output_dir={ref_dir}"
                 for o in Study(loaded, spec_dir, out).cell_overrides(cell)]
    subprocess.run([sys.executable, "-m", "llava_smoe.cli", "train", str(tmp_path / "toy.yaml"), *overrides],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    from llava_smoe.study.metrics import cell_metrics

    reference = cell_metrics(ref_dir)
    assert resumed["eval/loss"] == pytest.approx(reference["eval/loss"], abs=1e-6)
    assert resumed["train/loss"] == pytest.approx(reference["train/loss"], abs=1e-6)
    assert resumed["steps"] == reference["steps"] == 40

    # The report: per-variant statistics and paired differences equal a hand computation.
    report = json.loads((out / "study.json").read_text())
    cells = {(c["variant"], c["seed"]): c["metrics"] for c in report["cells"]}
    x = [cells[("competesmoe", s)]["eval/loss"] for s in (0, 1)]
    b = [cells[("smoe", s)]["eval/loss"] for s in (0, 1)]
    stats = report["variants"]["competesmoe"]["eval/loss"]
    mean, sd = sum(x) / 2, abs(x[0] - x[1]) / math.sqrt(2)
    assert stats["mean"] == pytest.approx(mean) and stats["sd"] == pytest.approx(sd)
    assert stats["ci_high"] == pytest.approx(mean + T975[1] * sd / math.sqrt(2))
    d = [x[0] - b[0], x[1] - b[1]]
    paired = report["paired"]["competesmoe"]["eval/loss"]
    assert paired["mean_diff"] == pytest.approx(sum(d) / 2)
    assert paired["ci_low"] == pytest.approx(sum(d) / 2 - T975[1] * (abs(d[0] - d[1]) / math.sqrt(2)) / math.sqrt(2))
    assert report["overhead"]["competesmoe"]["n"] == 2 and report["variants"]["smoe"]["steps"]["mean"] == 40
    assert report["variants"]["competesmoe"]["expert_evals_per_token"]["mean"] > 2.0  # competition steps run all 4
    # Equal wall-clock: at the fastest variant's mean training time; a variant whose cells had not
    # evaluated by then (a loaded machine slows cells unevenly) has no value rather than a guess.
    ewc = report["equal_wall_clock"]
    done_cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/*/cell.json"))]
    times = {v: [c["metrics"]["train_seconds"] for c in done_cells if c["variant"] == v] for v in ("smoe", "competesmoe")}
    assert ewc["seconds"] == pytest.approx(min(sum(t) / len(t) for t in times.values()))
    reached = {c["variant"] for c in done_cells
               if any("eval/loss" in p and p["seconds"] <= ewc["seconds"] for p in c["metrics"]["curve"])}
    assert reached and set(ewc["variants"]) == reached
    assert set(ewc["not_reached"]) == {"smoe", "competesmoe"} - reached  # named, not silently left out
    assert report["environment"]["code"]["commit"] and report["environment"]["versions"]["torch"]
    assert "competesmoe's eval/loss is" in report["verdicts"][0]
    md = (out / "study.md").read_text()
    assert "## At equal steps" in md and "## At equal wall-clock" in md and "| competesmoe | 2 |" in md
    assert ("logged by then for: " in md) == bool(ewc["not_reached"])
    for name in ("curves_eval_loss.png", "final_eval_loss.png", "overhead.png"):
        width, height = _png_size(out / name)
        assert width > 200 and height > 200

    # Settings that changed are named, and refused unless mixing is allowed.
    changed = write_spec(tmp_path, {"smoe": ["toy.moe.router=smoe", "toy.moe.top_k=1"], "competesmoe": [
        "toy.moe.router=competesmoe", "toy.moe.router_options.warmup_fraction=0.0",
        "toy.moe.router_options.competition_prob=0.5"]})
    refused = study(changed, out, env=env)
    assert refused.returncode == 1
    assert "smoe/s0: config.toy.moe.top_k: 2 -> 1" in refused.stderr and "--allow-mixed" in refused.stderr
    allowed = study(changed, out, "--allow-mixed", env=env)
    assert allowed.returncode == 0 and "warning: mixing provenance: smoe/s0" in allowed.stdout

    # Cells run from other code (a study resumed with --allow-mixed) are named with their commit.
    from llava_smoe.study.report import aggregate, markdown
    from llava_smoe.study.spec import load_spec

    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/*/cell.json"))]
    assert [len(e["cells"]) for e in aggregate(load_spec(spec)[0], records)["environments"]] == [4]
    other = next(r for r in records if r["variant"] == "smoe" and r["seed"] == 1)
    other["provenance"]["code"] = {"commit": "f" * 40, "uncommitted": None}
    mixed = aggregate(load_spec(spec)[0], records)
    assert {e["code"]["commit"]: e["cells"] for e in mixed["environments"]}["f" * 40] == ["smoe/s1"]
    assert "**The cells ran in 2 environments:**" in markdown(mixed) and f"code {'f' * 12}; " in markdown(mixed)
    # A cell that had not evaluated by the equal-wall-clock time is left out of its variant's mean by name.
    late = next(r for r in records if r["variant"] == "competesmoe" and r["seed"] == 0)
    late["metrics"]["curve"] = [{**p, "seconds": p["seconds"] + 1e6} for p in late["metrics"]["curve"]]
    for r in records:
        if r is not late:  # every other cell evaluated from the start
            r["metrics"]["curve"] = [{**p, "seconds": 0.0} for p in r["metrics"]["curve"]]
    partial = aggregate(load_spec(spec)[0], records)
    assert partial["equal_wall_clock"]["seeds_not_reached"] == {"competesmoe": [0]}
    assert partial["equal_wall_clock"]["variants"]["competesmoe"]["n"] == 1
    assert "| competesmoe | 1 |" in markdown(partial) and "paired test: competesmoe s0." in markdown(partial)


def test_spec_errors_name_the_key(tmp_path):
    from llava_smoe.cli import main
    from llava_smoe.config import ConfigError
    from llava_smoe.study.spec import load_spec

    spec = write_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    for change, message in (({"baseline": "dense"}, "baseline: 'dense' is not one of the variants"),
                            ({"primary": {"name": "accuracy"}}, "evaluate: metrics ['accuracy'] need an `evaluate`"),
                            ({"seeds": [0, 0]}, "seeds: need distinct seeds"),
                            ({"variant": {}}, "unknown key 'variant'"),
                            ({"shared": [{"name": "data", "synth": {}, "max_loss": 0.1}]},
                             "stage 'data' generates data: only a training stage has a loss"),
                            ({"wall_clock_metric": "train/loss"}, "wall_clock_metric: 'train/loss' is not logged"),
                            ({"wall_clock_metric": "eval/acc"}, "wall_clock_metric: 'eval/acc' is not a metric")):
        spec.write_text(yaml.safe_dump({**data, **change}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_spec(spec)
    spec.write_text(yaml.safe_dump({**data, "variants": {**data["variants"], "broken": ["toy.moe.router=nope"]}}))
    assert main(["study", str(spec), "--out", str(tmp_path / "o"), "--dry-run"]) == 2


def test_a_spec_extends_another_in_its_folder(tmp_path):
    from llava_smoe.config import ConfigError
    from llava_smoe.study.spec import load_spec

    base = write_spec(tmp_path)
    data = yaml.safe_load(base.read_text())
    base.write_text(yaml.safe_dump({**data, "overrides": ["train.max_steps=8"]}))
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump({"extends": "spec.yaml", "name": "longer", "seeds": [3],
                                      "overrides": ["train.max_steps=16"]}))
    spec, spec_dir = load_spec(longer)
    assert (spec.name, spec.seeds, spec_dir) == ("longer", [3], tmp_path)
    assert spec.overrides == ["train.max_steps=8", "train.max_steps=16"]  # the base's first: the later wins
    assert spec.variants == data["variants"] and spec.baseline == "smoe" and spec.min_tokens == 1000

    # Shared stages merge by name: the base's order kept, a same-named stage replaced in place.
    base.write_text(yaml.safe_dump({**data, "shared": [{"name": "data", "synth": {"num_train": 8}},
                                                       {"name": "stage1", "recipe": "toy.yaml"}]}))
    longer.write_text(yaml.safe_dump({"extends": "spec.yaml", "name": "longer", "shared": [
        {"name": "stage2", "recipe": "toy.yaml", "overrides": ["train.max_steps=3"]},
        {"name": "data", "synth": {"num_train": 16}}]}))
    spec, _ = load_spec(longer)
    assert [(s.name, s.synth, s.overrides) for s in spec.shared] == [
        ("data", {"num_train": 16}, []), ("stage1", None, []), ("stage2", None, ["train.max_steps=3"])]
    longer.write_text(yaml.safe_dump({"extends": "spec.yaml", "name": "longer", "shared": {"name": "data"}}))
    with pytest.raises(ConfigError, match=re.escape("shared: a list of stages (mappings)")):
        load_spec(longer)

    for extends, message in (("../spec.yaml", "extends: '../spec.yaml': name a spec file in the same folder"),
                             ("gone.yaml", "study spec not found: " + str(tmp_path / "gone.yaml")
                              + f" (extended by {longer})"),
                             ("longer.yaml", "extends: longer.yaml extends itself")):
        longer.write_text(yaml.safe_dump({"extends": extends, "name": "longer"}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_spec(longer)


def test_a_stage_like_another_adds_its_overrides_to_that_stages(tmp_path):
    from llava_smoe.config import ConfigError
    from llava_smoe.study.spec import load_spec

    base = write_spec(tmp_path)
    data = yaml.safe_load(base.read_text())
    stages = [{"name": "data", "synth": {"num_train": 8}},
              {"name": "stage1", "recipe": "toy.yaml", "overrides": ["train.max_steps=3"], "max_loss": 0.5},
              {"name": "stage1_wide", "like": "stage1", "overrides": ["toy.hidden_size=32"]},
              {"name": "stage1_loose", "like": "stage1_wide", "max_loss": 0.9}]
    base.write_text(yaml.safe_dump({**data, "shared": stages}))
    spec, _ = load_spec(base)
    assert [(s.name, s.recipe, s.overrides, s.max_loss) for s in spec.shared[1:]] == [
        ("stage1", "toy.yaml", ["train.max_steps=3"], 0.5),
        ("stage1_wide", "toy.yaml", ["train.max_steps=3", "toy.hidden_size=32"], 0.5),
        ("stage1_loose", "toy.yaml", ["train.max_steps=3", "toy.hidden_size=32"], 0.9)]
    # Under `extends`, a stage like the base's stage of its own name replaces it, changed.
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump({"extends": "spec.yaml", "name": "longer", "shared": [
        {"name": "stage1_wide", "like": "stage1_wide", "overrides": ["optim.groups.0.lr=0.005"]}]}))
    spec, _ = load_spec(longer)
    assert [s.name for s in spec.shared] == ["data", "stage1", "stage1_wide", "stage1_loose"]
    assert spec.shared[2].overrides == ["train.max_steps=3", "toy.hidden_size=32", "optim.groups.0.lr=0.005"]
    assert spec.shared[3].overrides == ["train.max_steps=3", "toy.hidden_size=32"]  # resolved in the base already

    base.write_text(yaml.safe_dump({**data, "shared": [*stages[:2], stages[1]]}))
    with pytest.raises(ConfigError, match=re.escape("shared: stage names must be unique, got ['data', 'stage1', "
                                                    "'stage1']")):
        load_spec(base)
    longer.write_text(yaml.safe_dump({"extends": "spec.yaml", "name": "longer", "shared": [stages[0], stages[0]]}))
    with pytest.raises(ConfigError, match="stage names must be unique"):
        load_spec(longer)
    for bad, message in (({"like": "stage2"}, "shared.2.like: 'stage2' is not a stage before it: ['data', 'stage1']"),
                         ({"like": "data"}, "shared.2.like: 'data' is not a training stage"),
                         ({"like": "stage1", "recipe": "toy.yaml"}, "shared.2.recipe: a stage like 'stage1' takes its"),
                         ({"like": "stage1", "overrides": "toy.hidden_size=32"}, "shared.2.overrides: a list")):
        base.write_text(yaml.safe_dump({**data, "shared": [*stages[:2], {"name": "stage1_wide", **bad}]}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_spec(base)


def test_committed_specs_validate_every_shared_stage_and_cell(tmp_path, capsys):
    from llava_smoe.cli import main

    folder = ROOT / "train" / "study"
    specs = [p for p in sorted(folder.glob("*.yaml")) if {"variants", "extends"} & set(yaml.safe_load(p.read_text()))]
    assert {p.name for p in specs} >= {"text-routers.yaml", "shapes-hard.yaml", "shapes-hard-long.yaml",
                                      "shapes-lookup.yaml", "facts-capacity.yaml", "facts-lr-sweep.yaml",
                                      "text-lr-sweep.yaml", "facts-capacity-confirm.yaml",
                                      "shapes-hard-lowlr.yaml", "shapes-hard-routers-lr.yaml"}
    for path in specs:
        assert main(["study", str(path), "--out", str(tmp_path / path.stem), "--dry-run"]) == 0, path.name
    assert "dense_wide/s2: " in capsys.readouterr().out

    # A shared stage's bad setting stops the dry run, naming the stage and the key.
    data = yaml.safe_load((folder / "shapes-hard.yaml").read_text())
    data["recipe"] = str(folder / data["recipe"])
    for stage in data["shared"]:
        if "recipe" in stage:
            stage["recipe"] = str(folder / stage["recipe"])
    data["shared"][3]["overrides"].append("vlm.model.projector.typo=1")
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert main(["study", str(spec), "--out", str(tmp_path / "bad"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "shared stage stage1 (seed 0)" in err and "vlm.model.projector.typo" in err, err
    data["shared"][0]["synth"]["world"] = "harder"
    spec.write_text(yaml.safe_dump(data))
    assert main(["study", str(spec), "--out", str(tmp_path / "bad"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "shared stage data (seed 0): synth.world: 'harder' is not a world" in err, err


def test_a_stage_reads_the_worlds_settings_from_its_synth_stage(tmp_path, capsys):
    from llava_smoe.cli import main
    from llava_smoe.study.runner import Study
    from llava_smoe.study.spec import load_spec

    folder = ROOT / "train" / "study"
    spec, spec_dir = load_spec(folder / "shapes-hard.yaml")
    vision = next(s for s in spec.shared if s.name == "vision")
    assert "clip.model.vision_config.image_size={data.image_size}" in vision.overrides
    study = Study(spec, spec_dir, tmp_path / "study")
    assert "clip.model.vision_config.image_size=48" in study.stage_overrides(vision, 0)

    data = yaml.safe_load((folder / "shapes-hard.yaml").read_text())
    data["recipe"] = str(folder / data["recipe"])
    for stage in data["shared"]:
        if "recipe" in stage:
            stage["recipe"] = str(folder / stage["recipe"])
    data["shared"][0]["synth"]["image_size"] = 64  # the stage follows the world's field, not the preset's
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    spec, spec_dir = load_spec(bad)
    assert "clip.model.vision_config.image_size=64" in Study(spec, spec_dir, tmp_path / "b").stage_overrides(
        spec.shared[1], 0)

    data["shared"][1]["overrides"][-1] = "clip.model.vision_config.image_size={data.imagesize}"
    bad.write_text(yaml.safe_dump(data))
    assert main(["study", str(bad), "--out", str(tmp_path / "bad"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "shared.vision.overrides: unknown placeholder field" in err and "imagesize" in err, err
    data["shared"][1]["overrides"][-1] = "clip.model.vision_config.image_size={world.image_size}"
    bad.write_text(yaml.safe_dump(data))
    assert main(["study", str(bad), "--out", str(tmp_path / "bad"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown placeholder 'world'" in err and "'data'" in err, err

    data["shared"][0]["name"] = "seed"
    bad.write_text(yaml.safe_dump(data))
    assert main(["study", str(bad), "--out", str(tmp_path / "bad"), "--dry-run"]) == 2
    assert "shared.0.name: 'seed' is a placeholder of its own" in capsys.readouterr().err


def test_a_shared_stage_above_its_max_loss_stops_its_seed(tmp_path):
    from llava_smoe.study.runner import Study, StudyError
    from llava_smoe.study.spec import load_spec

    spec = write_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    spec.write_text(yaml.safe_dump({**data, "shared": [{"name": "stage1", "recipe": "toy.yaml", "max_loss": 0.5}]}))
    loaded, spec_dir = load_spec(spec)
    out = tmp_path / "study"
    runner = Study(loaded, spec_dir, out, log=lambda *_: None)
    for seed, losses in ((0, [2.0, 0.6, 0.4, 0.45, 0.5, 0.45]), (1, [2.0, 0.9, 0.7, 0.6, 0.55])):
        stage = out / "shared" / f"s{seed}" / "stage1"
        (stage / "final").mkdir(parents=True)  # finished: run_shared checks it without training
        rows = [{"step": 25 * (i + 1), "loss": x} for i, x in enumerate(losses)] + [{"step": 150, "eval/loss": 0.1}]
        (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner.run_shared(0)  # mean of the last four: 0.45
    with pytest.raises(StudyError, match=re.escape("shared stage stage1 (seed 1) ended at loss 0.6875 "
                                                   "(mean of its last 4 logged), above its max_loss 0.5")):
        runner.run_shared(1)
    (out / "shared" / "s1" / "stage1" / "metrics.jsonl").write_text("")
    with pytest.raises(StudyError, match="no training loss"):
        runner.run_shared(1)


def test_a_finished_shared_stage_is_reused_only_with_the_settings_it_ran_with(tmp_path):
    """A stage copied from another study serves (its paths read as under this study's shared
    folder); one whose settings the spec has since changed stops the study, naming the keys."""
    from llava_smoe.study.runner import Study, StudyError
    from llava_smoe.study.spec import load_spec
    from llava_smoe.training.recipe import load_recipe

    spec = write_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    stages = [{"name": "data", "synth": {"num_train": 8, "num_test": 4}},
              {"name": "stage1", "recipe": "toy.yaml",
               "overrides": ["train.deepspeed_config={shared}/ds.json", "train.log_every=1"]}]

    def study_with(stages, **kwargs):
        spec.write_text(yaml.safe_dump({**data, "shared": stages}))
        loaded, spec_dir = load_spec(spec)
        return Study(loaded, spec_dir, tmp_path / "study", **kwargs)

    # What the stage recorded when it ran in another study, then was copied here.
    other = tmp_path / "other" / "shared" / "s0"
    ran = {**TOY, "train": {**TOY["train"], "output_dir": str(other / "stage1"), "save_every": 99,
                            "deepspeed_config": str(other / "ds.json")}}
    stage1 = tmp_path / "study" / "shared" / "s0" / "stage1"
    (stage1 / "final").mkdir(parents=True)

    def record(**train):
        (tmp_path / "ran.yaml").write_text(yaml.safe_dump({**ran, "train": {**ran["train"], **train}}))
        recorded = load_recipe(tmp_path / "ran.yaml").to_dict()
        (stage1 / "run_config.yaml").write_text(yaml.safe_dump(recorded))
        return recorded

    record()
    manifest = stage1.parent / "data" / "manifest.json"
    manifest.parent.mkdir()
    runner = study_with(stages)
    manifest.write_text(json.dumps({"config": runner.stage_settings(runner.spec.shared[0], 0)}))
    with pytest.raises(StudyError) as err:
        study_with(stages).check_shared(0)
    assert str(err.value) == (f"shared stage stage1 (seed 0) in {stage1} ran with other settings than the spec "
                              f"gives it: train.log_every: 2 -> 1 -- delete {stage1} to run it again, or pass "
                              "--allow-mixed")  # its paths, output folder and save interval are not differences

    record(log_every=1)
    study_with(stages).check_shared(0)  # the same settings: reused
    recorded = record(log_every=1)
    recorded["optim"]["groups"][0]["lr"] = 0.5
    (stage1 / "run_config.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(StudyError, match=re.escape("gives it: optim.groups.0.lr: 0.5 -> 0.01 --")):
        study_with(stages).check_shared(0)
    log = []
    study_with(stages, allow_mixed=True, log=log.append).check_shared(0)
    assert log == [(f"warning: reusing shared stage stage1 (seed 0) in {stage1} ran with other settings than the "
                    "spec gives it: optim.groups.0.lr: 0.5 -> 0.01")]

    # A data stage's generator settings count too; a finished stage without its record is refused.
    with pytest.raises(StudyError, match=re.escape("shared stage data (seed 0)") + ".*num_train: 8 -> 16"):
        study_with([{**stages[0], "synth": {"num_train": 16, "num_test": 4}}, stages[1]]).check_shared(0)
    (stage1 / "run_config.yaml").unlink()
    with pytest.raises(StudyError, match="is finished but has no run_config.yaml to tell what settings it ran with"):
        study_with(stages).check_shared(0)


def test_a_seeds_cells_start_while_another_seeds_shared_stages_run(tmp_path, monkeypatch):
    """With two workers, seed 0's cells do not wait for seed 1's shared stages (seed 1's stage
    here finishes only once a seed-0 cell has started), and a failed seed's cells are not run."""
    import threading

    from llava_smoe.study.runner import Study, StudyError
    from llava_smoe.study.spec import load_spec

    loaded, spec_dir = load_spec(write_spec(tmp_path))
    started: list[str] = []
    seed0_cell = threading.Event()

    def run_shared(self, seed):
        if seed == 1 and not seed0_cell.wait(timeout=60):
            raise StudyError("no seed-0 cell started while seed 1's shared stages ran")
        if seed == 1:
            raise StudyError("seed 1's stage stalled")

    def run_cell(self, cell, env):
        started.append(cell.key)
        if cell.seed == 0:
            seed0_cell.set()

    monkeypatch.setattr(Study, "run_shared", run_shared)
    monkeypatch.setattr(Study, "run_cell", run_cell)
    monkeypatch.setattr(Study, "check_shared", lambda self, seed: None)
    with pytest.raises(StudyError) as err:
        Study(loaded, spec_dir, tmp_path / "study", workers=2, log=lambda *_: None).run()
    assert str(err.value) == "1 part(s) failed: shared s1: seed 1's stage stalled"
    assert sorted(started) == ["competesmoe/s0", "smoe/s0"]


def test_accuracy_logged_in_training_is_compared_at_equal_wall_clock(tmp_path):
    """eval/accuracy logged at each evaluation (vlm.eval_accuracy) joins the cells' curves (skip
    counts do not), and the spec's wall_clock_metric compares it at the fastest variant's time."""
    from llava_smoe.config import parse
    from llava_smoe.study.metrics import cell_metrics
    from llava_smoe.study.report import write_report
    from llava_smoe.study.spec import StudySpec

    accuracy = {("fast", 0): (0.4, 0.6), ("fast", 1): (0.5, 0.7), ("slow", 0): (0.3, 0.9), ("slow", 1): (0.2, 0.8)}
    records = []
    for (variant, seed), (at20, at40) in accuracy.items():
        run = tmp_path / variant / f"s{seed}"
        run.mkdir(parents=True)
        per_interval = 1.0 if variant == "fast" else 2.0  # seconds per 10 steps
        rows = []
        for step in (10, 20, 30, 40):
            rows.append({"step": step, "loss": 1.0 / step, "interval_s": per_interval, "tokens_per_s": 100.0})
            if step in (20, 40):
                acc = at20 if step == 20 else at40
                rows.append({"step": step, "eval/loss": 1.0 - acc, "eval/accuracy": acc,
                             "eval/accuracy/count": acc / 2, "eval/skipped/too_long": 3})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = cell_metrics(run)
        assert metrics["curve"][0] == {"step": 20, "tokens": 200.0 * per_interval, "seconds": 2 * per_interval,
                                       "eval/loss": pytest.approx(1.0 - at20), "eval/accuracy": at20,
                                       "eval/accuracy/count": at20 / 2}
        assert metrics["eval/accuracy"] == at40 and "eval/skipped/too_long" not in metrics
        records.append({"variant": variant, "seed": seed, "status": "done", "metrics": metrics,
                        "provenance": {"device": "cpu", "code": {"commit": "0" * 40}}})
    spec = parse(StudySpec, {"name": "acc", "recipe": "r.yaml", "seeds": [0, 1], "baseline": "fast",
                             "variants": {"fast": [], "slow": []}, "primary": {"name": "eval/accuracy", "goal": "max"},
                             "secondary": ["eval/accuracy/count"], "wall_clock_metric": "eval/accuracy"}, ())
    report = write_report(spec, records, tmp_path)
    ewc = report["equal_wall_clock"]
    assert ewc["metric"] == "eval/accuracy" and ewc["seconds"] == pytest.approx(4.0)  # the fast cells' time
    # At 4 s the slow cells have their first evaluation only (at 4 s): 0.3 and 0.2; the fast ones their last.
    assert ewc["variants"]["slow"]["mean"] == pytest.approx(0.25)
    assert ewc["variants"]["fast"]["mean"] == pytest.approx(0.65)
    assert ewc["paired"]["slow"]["mean_diff"] == pytest.approx(-0.4)
    assert report["paired"]["slow"]["eval/accuracy"]["mean_diff"] == pytest.approx(0.2)  # at equal steps
    assert "eval/accuracy after 4 s of training" in (tmp_path / "study.md").read_text()
    for name in ("curves_eval_accuracy.png", "curves_eval_loss.png"):
        width, height = _png_size(tmp_path / name)
        assert width > 200 and height > 200


def test_a_sweep_runs_every_variant_at_each_value_and_reports_each_best(tmp_path, capsys):
    """`sweep`: cells <variant>@<value> with the value's override last, each compared with the
    baseline at the same value; each variant's best value by its mean, and best against best."""
    from llava_smoe.cli import main
    from llava_smoe.config import ConfigError
    from llava_smoe.study.report import write_report
    from llava_smoe.study.spec import load_spec

    path = write_spec(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["sweep"] = {"key": "optim.groups.0.lr", "values": [2.5e-3, 5.0e-3, 1.0e-2]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec, _ = load_spec(path)
    assert list(spec.cell_variants) == ["smoe@0.0025", "smoe@0.005", "smoe@0.01",
                                        "competesmoe@0.0025", "competesmoe@0.005", "competesmoe@0.01"]
    assert spec.cell_variants["competesmoe@0.01"] == [*data["variants"]["competesmoe"], "optim.groups.0.lr=0.01"]
    assert spec.baseline_of("competesmoe@0.0025") == "smoe@0.0025"
    assert main(["study", str(path), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^competesmoe@0\.01/s1: .*optim\.groups\.0\.lr=0\.01 ", printed, re.MULTILINE), printed

    # eval/loss per (variant, value, seed): smoe is best at 0.01 (an end), competesmoe at 0.005.
    loss = {("smoe", "0.0025"): (3.0, 3.2), ("smoe", "0.005"): (2.6, 2.8), ("smoe", "0.01"): (2.0, 2.4),
            ("competesmoe", "0.0025"): (1.9, 2.3), ("competesmoe", "0.005"): (1.5, 2.1),
            ("competesmoe", "0.01"): (2.5, 2.5)}
    records = [{"variant": f"{v}@{value}", "seed": seed, "status": "done",
                "metrics": {"eval/loss": x, "train/loss": x, "tokens": 2000, "steps": 40, "seconds_per_step": 0.1},
                "provenance": {"device": "cpu", "code": {"commit": "0" * 40}}}
               for (v, value), losses in loss.items() for seed, x in zip((0, 1), losses)]
    report = write_report(spec, records, tmp_path)
    # At the same value: competesmoe@0.01 - smoe@0.01 = (+0.5, +0.1).
    assert report["paired"]["competesmoe@0.01"]["eval/loss"]["mean_diff"] == pytest.approx(0.3)
    assert report["paired"]["competesmoe@0.005"]["eval/loss"]["mean_diff"] == pytest.approx(-0.9)
    sweep = report["sweep"]
    assert {v: b["value"] for v, b in sweep["best"].items()} == {"smoe": "0.01", "competesmoe": "0.005"}
    assert sweep["best_at_edge"] == ["smoe"]
    best = sweep["paired_best"]["competesmoe"]  # (1.5, 2.1) against (2.0, 2.4)
    assert best["mean_diff"] == pytest.approx(-0.4) and best["seeds"] == [0, 1]
    width, height = _png_size(tmp_path / "sweep_eval_loss.png")
    assert width > 200 and height > 200
    md = (tmp_path / "study.md").read_text()
    assert "| competesmoe | 2.1000 | **1.8000** | 2.5000 | 0.005 | -0.4000" in md, md
    assert "**Best at an end of the sweep** (the optimum may lie beyond it): smoe." in md
    assert any(v.startswith("competesmoe at its best (competesmoe@0.005)'s eval/loss is 0.4 lower (better) "
                            "than smoe@0.01 (the baseline's best)") for v in report["verdicts"]), report["verdicts"]

    data["variants"]["competesmoe"].append("optim.groups.0.lr=1e-3")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape("variants.competesmoe: sets optim.groups.0.lr, which the sweep sets")):
        load_spec(path)
    data["variants"]["competesmoe"].pop()
    data["sweep"]["values"] = [1.0e-2]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape("sweep.values: a sweep needs at least two values")):
        load_spec(path)
    data["sweep"]["values"] = [1.0e-2, 2.5e-3]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape("sweep.values: list numbers in increasing order, got ['0.01', '0.0025']")):
        load_spec(path)
    # Names have no order, so no end to flag.
    data["sweep"] = {"key": "toy.moe.router_options.balance_count", "values": ["top1", "all"]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert not load_spec(path)[0].sweep.ordered
