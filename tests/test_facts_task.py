"""The `facts` task (a capacity probe): the seed's table, the loss on the value alone, recall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from llava_smoe.config import ConfigError
from llava_smoe.tasks.facts import FactsTaskConfig, FactTable, collate
from llava_smoe.training import trainer as trainer_mod
from llava_smoe.training.recipe import load_recipe
from llava_smoe.training.tasks import IGNORE_INDEX, get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ["facts.model.architecture.hidden_size=32", "facts.model.architecture.intermediate_size=64",
        "facts.model.architecture.num_hidden_layers=2", "facts.model.architecture.num_attention_heads=2",
        "facts.model.architecture.num_key_value_heads=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(tmp_path: Path, *overrides: str):
    return load_recipe(ROOT / "train/facts/tiny.yaml", [*TINY, f"train.output_dir={tmp_path / 'out'}",
                                                        "train.progress_bar=false", *overrides])


def test_the_table_is_the_seeds_every_key_once_and_the_loss_is_on_the_value():
    config = FactsTaskConfig(properties=5, colors=2, shapes=3, values=4)
    table = FactTable(config, seed=7)
    assert len(table) == 30 == config.num_facts
    keys = {tuple(row[:3].tolist()) for row in table.tokens}
    assert len(keys) == 30  # every (property, colour, shape) once
    assert keys == {(p, 5 + c, 7 + s) for p in range(5) for c in range(2) for s in range(3)}
    assert set(table.tokens[:, 3].tolist()) <= set(range(10, 14)) and table.tokens.max() < config.vocab_size
    assert torch.equal(table.values, FactTable(config, seed=7).values)
    assert not torch.equal(table.values, FactTable(config, seed=8).values)
    batch = collate([table[0], table[1]])
    assert batch["labels"][:, :3].eq(IGNORE_INDEX).all() and torch.equal(batch["labels"][:, 3], batch["input_ids"][:, 3])


class Constant(nn.Module):
    """Ranks `value` first for every key."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 1.0
        return type("Out", (), {"logits": logits})


class Oracle(nn.Module):
    """Ranks each key's true value first, but the next value for the facts numbered in `wrong`."""

    def __init__(self, table: FactTable, config: FactsTaskConfig, wrong: set[int]):
        super().__init__()
        first = config.properties + config.colors + config.shapes
        ranked = [int(v) + 1 if i in wrong else int(v) for i, v in enumerate(table.values)]
        self.token = {tuple(row[:3].tolist()): first + v % config.values for row, v in zip(table.tokens, ranked)}
        self.vocab = config.vocab_size

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for i, row in enumerate(input_ids):
            logits[i, -1, self.token[tuple(row.tolist())]] = 1.0
        return type("Out", (), {"logits": logits})


def test_recall_is_the_fraction_of_facts_whose_value_is_ranked_first(tmp_path):
    run = recipe(tmp_path, "facts.properties=6")
    parts = get_task("facts").build(run)
    table, config = parts.train_dataset, run.task_config
    first_value = config.properties + config.colors + config.shapes
    by_hand = float((table.values == 3).float().mean())
    assert parts.evaluate_fn(Constant(config.vocab_size, first_value + 3)) == {"eval/accuracy": pytest.approx(by_hand)}
    assert parts.evaluate_fn(Oracle(table, config, wrong={0, 5, 9})) == {
        "eval/accuracy": pytest.approx(1 - 3 / config.num_facts)}


def test_a_small_table_is_learnt_and_its_recall_logged_at_every_evaluation(tmp_path):
    result = trainer_mod.train(recipe(tmp_path, "facts.properties=2", "facts.model.moe=null", "train.max_steps=300",
                                      "train.eval_every=100", "optim.groups.0.lr=3e-3"))
    assert result.status == "completed"
    evals = [r for r in map(json.loads, (tmp_path / "out/metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["eval/accuracy"] >= 0.9  # 24 facts, each seen 300 times; chance is 1 / 8
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]


def test_every_router_trains_on_the_table(tmp_path):
    for router in ("competesmoe", "remoe"):
        result = trainer_mod.train(recipe(tmp_path / router, f"facts.model.moe.router={router}", "train.max_steps=12",
                                          "train.eval_every=6", "train.log_every=6"))
        assert result.status == "completed"
        records = [json.loads(line) for line in (tmp_path / router / "out/metrics.jsonl").read_text().splitlines()]
        assert any("routing/all/load_cv" in r for r in records) and sum("eval/accuracy" in r for r in records) == 2


def test_bad_sizes_name_the_key():
    with pytest.raises(ConfigError, match=r"facts\.values"):
        load_recipe(ROOT / "train/facts/tiny.yaml", ["facts.values=1"])
    with pytest.raises(ConfigError, match=r"facts\.properties"):
        load_recipe(ROOT / "train/facts/tiny.yaml", ["facts.properties=0"])
