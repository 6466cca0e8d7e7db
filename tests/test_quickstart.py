"""The quickstart's plumbing: every tiny recipe of train/tiny, chained, on a small shapes world.

Steps are cut to a few per stage (accuracy is measured by the real run, see docs/quickstart.md);
this checks that the stages hand their outputs on and that the summary describes the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_smoe.quickstart import STAGES, run_quickstart

RECIPES = Path(__file__).resolve().parents[1] / "train" / "tiny"


@pytest.mark.slow
def test_quickstart_chains_every_tiny_stage(tmp_path):
    torch.set_num_threads(1)
    summary = run_quickstart(tmp_path / "out", tmp_path / "data", RECIPES, router="smoe", progress=False,
                             num_train=48, num_test=100, overrides=["train.max_steps=2", "train.micro_batch_size=8"])
    out = tmp_path / "out"
    for stage in STAGES:
        assert (out / stage / "final").is_dir(), stage
    # Stage 1 loads stage 0b's tower (frozen) and stage 0's LM; stage 2 upcycles with the router asked for.
    pretrain = json.loads((out / "pretrain" / "final" / "config.json").read_text())
    assert pretrain["vision_config"]["freeze"] is True and pretrain["vision_config"]["feature_layer"] == -2
    final = json.loads((out / "finetune_moe" / "final" / "config.json").read_text())
    assert final["text_config"]["llava_smoe_moe"]["moe_config"]["router"] == "smoe"
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved) >= {"accuracy", "blind_accuracy", "router", "seconds", "checkpoint", "accuracy_by_type"}
    assert 0.0 <= saved["accuracy"] <= 1.0 and saved["num_questions"] > 100
    assert "exists" not in saved["accuracy_by_type"]  # presence questions are off by default
    assert set(saved["stage_seconds"]) == {"data", *STAGES, "eval"}

    # A second run reuses the data made with the same generator settings.
    made = (tmp_path / "data" / "manifest.json").stat().st_mtime_ns
    run_quickstart(tmp_path / "out2", tmp_path / "data", RECIPES, router="smoe", progress=False,
                   num_train=48, num_test=100, overrides=["train.max_steps=1", "train.micro_batch_size=8"])
    assert (tmp_path / "data" / "manifest.json").stat().st_mtime_ns == made
