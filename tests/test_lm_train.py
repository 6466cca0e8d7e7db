"""The `lm` task end to end on CPU: training, evaluation, cache reuse, resume, every router, compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from lm_helpers import lm_recipe, metrics, write_corpus

from llava_smoe.config import ConfigError
from llava_smoe.evaluation.compare import PNG_SIGNATURE
from llava_smoe.model import lm_moe, load_language_model
from llava_smoe.tasks.lm import LMTaskConfig
from llava_smoe.training import trainer as trainer_mod
from llava_smoe.training.config import RunConfig
from llava_smoe.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def train(recipe: dict):
    return trainer_mod.train(RunConfig.parse(json.loads(json.dumps(recipe))))


def eval_losses(out: Path) -> list[float]:
    return [r["eval/loss"] for r in metrics(out) if "eval/loss" in r]


def test_lm_trains_evaluates_and_exports_a_loadable_model(tmp_path, corpus):
    recipe = lm_recipe(tmp_path, corpus, max_steps=30, eval_every=10, log_every=5)
    result = train(recipe)
    assert result.status == "completed"
    out = tmp_path / "out"
    losses = eval_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    records = [r for r in metrics(out) if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and "routing/all/load_cv" in r for r in records)
    data = json.loads((out / "data.json").read_text())
    assert data["tokens_per_step"] == 32 * 4 and data["eval_sequences"] > 0
    assert data["train_corpus"]["documents"] == 600 and not data["train_corpus"]["reused"]
    lm = load_language_model(str(out / "final")).eval()
    assert lm_moe(lm.config).moe_config.router == "smoe"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = torch.tensor([tok("How many sides does a square have?")["input_ids"]])
    with torch.no_grad():
        loss = lm(input_ids=ids, labels=ids).loss.item()
    assert loss < math.log(len(tok))  # better than uniform on in-distribution text


def test_second_run_reuses_the_token_cache(tmp_path, corpus):
    for name in ("a", "b"):
        recipe = lm_recipe(tmp_path, corpus, max_steps=1, output_dir=str(tmp_path / name))
        assert train(recipe).status == "completed"
    a, b = (json.loads((tmp_path / n / "data.json").read_text())["train_corpus"] for n in ("a", "b"))
    assert not a["reused"] and b["reused"] and a["cache"] == b["cache"]


def test_resumed_run_matches_uninterrupted(tmp_path, corpus, crash_at_step):
    common = dict(max_steps=8, save_every=4, eval_every=4)
    assert train(lm_recipe(tmp_path / "a", corpus, router="remoe", **common)).status == "completed"
    expected = {r["step"]: r for r in metrics(tmp_path / "a" / "out") if "loss" in r}

    recipe_b = lm_recipe(tmp_path / "b", corpus, router="remoe", **common)
    with crash_at_step(6), pytest.raises(KeyboardInterrupt):
        train(recipe_b)
    recipe_b["train"]["resume"] = "auto"
    assert train(recipe_b).status == "completed"
    got = {r["step"]: r for r in metrics(tmp_path / "b" / "out") if "loss" in r}
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in range(5, 9):
        for key in ("lm_loss", "aux/l1", "routing/all/sparsity", "routing/all/l1_lambda"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)
    assert eval_losses(tmp_path / "b" / "out") == pytest.approx(eval_losses(tmp_path / "a" / "out"), rel=1e-6)


ROUTER_OPTIONS = {
    # Compete on every step: the competition path runs, and every step has the same aux losses.
    "competesmoe": {"competition_prob": 1.0, "warmup_fraction": 0.0},
}
ROUTER_METRICS = {
    "remoe": ("routing/all/sparsity", "routing/all/l1_lambda"),
    "competesmoe": ("routing/all/competition_rate",),
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("router", ["smoe", "competesmoe", "remoe", "mot", "xmoe", "sigmoid"])
def test_every_router_trains(tmp_path, corpus, router, precision):
    recipe = lm_recipe(tmp_path, corpus, router=router, max_steps=3, precision=precision)
    recipe["lm"]["model"]["moe"]["router_options"] = ROUTER_OPTIONS.get(router, {})
    recipe["lm"]["max_eval_sequences"] = 4
    assert train(recipe).status == "completed"
    records = [r for r in metrics(tmp_path / "out") if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert math.isfinite(eval_losses(tmp_path / "out")[-1])
    for key in ROUTER_METRICS.get(router, ()):
        assert key in records[-1], key
    if router == "competesmoe":
        assert records[-1]["routing/all/competition_rate"] == 1.0 and "aux/distill" in records[-1]


def test_lm_task_rejects_bad_options_with_the_key(tmp_path, corpus):
    recipe = lm_recipe(tmp_path, corpus)
    recipe["lm"]["seq_lenn"] = 3
    with pytest.raises(ConfigError, match=r"lm\.seq_lenn"):
        train(recipe)
    recipe = lm_recipe(tmp_path, corpus)
    recipe["lm"]["model"]["moe"]["top_k"] = 9
    with pytest.raises(ConfigError, match=r"lm\.model.*top_k=9 exceeds"):
        train(recipe)
    recipe = lm_recipe(tmp_path, corpus)
    recipe["lm"]["seq_len"] = 100_000
    with pytest.raises(ConfigError, match="nothing is left for training|no sequence"):
        train(recipe)


def test_compare_writes_table_and_plots(tmp_path, capsys):
    from llava_smoe.cli import main

    def fake_run(name: str, router: str, sparsity: bool) -> Path:
        run = tmp_path / name
        run.mkdir()
        moe = {"num_experts": 8, "top_k": 2, "router": router}
        (run / "run_config.yaml").write_text(yaml.safe_dump({"task": "lm", "lm": {"model": {"moe": moe}}}))
        (run / "data.json").write_text(json.dumps({"tokens_per_step": 1000}))
        lines = []
        for step in range(10, 101, 10):
            rec = {"step": step, "loss": 3.0 - step / 100, "lm_loss": 3.0 - step / 100, "tokens_per_s": 5000.0,
                   "routing/all/load_cv": 0.5 / step ** 0.5}
            if sparsity:
                rec.update({"routing/all/sparsity": min(0.75, step / 100), "routing/all/l1_lambda": 1e-8 * 1.2 ** step})
            else:
                rec["routing/all/competition_rate"] = 0.05
            lines.append(json.dumps(rec))
            if step % 50 == 0:
                lines.append(json.dumps({"step": step, "eval/loss": 2.5 - step / 100}))
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        return run

    runs = [fake_run("remoe-8x2", "remoe", True), fake_run("compete-8x2", "competesmoe", False)]
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| remoe-8x2 | remoe | 8 | 2 | 100 | 100.00K | 1.5000 | 1.5000 | 4.48 |" in table
    assert "compete-8x2" in table and "0.050" in table and "ReMoE λ" in table
    assert "| remoe-8x2 | remoe |" in capsys.readouterr().out
    for png in ("val_loss.png", "load_balance.png", "remoe_sparsity.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, png
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["best_ppl"] == pytest.approx(math.exp(1.5))
    assert main(["compare", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_recipes_are_valid():
    run = load_recipe(ROOT / "train" / "lm" / "tiny.yaml")
    assert run.task == "lm" and run.task_config.model.moe.num_experts == 4
    paths = sorted((ROOT / "train" / "lm").glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:  # every documented recipe validates, its task section (and MoE config) included
        config = load_recipe(path).task_config
        assert isinstance(config, LMTaskConfig)
        assert config.seq_len == (64 if path.name == "tiny.yaml" else 1024), path.name


@pytest.mark.slow
def test_tiny_recipe_trains_on_the_shapes_world_text(tmp_path):
    from llava_smoe.data import generate_shapes_world
    from llava_smoe.data.synth import ShapesWorldConfig

    shapes = ShapesWorldConfig(num_train=600, num_val=10, num_test=10, num_heldout=10)
    generate_shapes_world(shapes, str(tmp_path / "shapes"))
    run = load_recipe(ROOT / "train" / "lm" / "tiny.yaml", [
        f"lm.data=[{tmp_path / 'shapes' / 'text.txt'}]", f"lm.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'out'}", "train.progress_bar=false",
        "train.max_steps=120", "train.eval_every=40",
    ])
    assert trainer_mod.train(run).status == "completed"
    losses = eval_losses(tmp_path / "out")
    assert len(losses) == 3 and losses[-1] < losses[0], losses
