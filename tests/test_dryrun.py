"""The real-width dry run (train/dryrun/...): CLIP-L/336 (3 blocks) + a Qwen2.5-0.5B-shaped LM
(4 layers, vocabulary 151,936) with CompeteSMoE competing in every other layer, random weights,
steps under DeepSpeed ZeRO-3 on 2 gloo processes with a checkpoint at step 2, then a run resumed
from that checkpoint, whose step 3 repeats the uninterrupted run's. (Its memory against the plan: `llava-smoe bench memory`, docs/benchmarks.md.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_smoe.data.mix665k import Mix665kConfig, generate_mix665k
from llava_smoe.training.distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train" / "dryrun" / "clip336-qwen05-competesmoe-zero3.yaml"


def run(data: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "llava_smoe.cli", "train", str(RECIPE),
           f"vlm.data={data / 'train.json'}", f"vlm.image_folder={data / 'images'}", f"vlm.tokenizer={data / 'tokenizer'}",
           f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


def test_real_width_zero3_dry_run_trains_saves_and_resumes(tmp_path):
    data = tmp_path / "data"
    generate_mix665k(Mix665kConfig(num_records=12, max_words=200), str(data))
    out = tmp_path / "run"
    run(data, out, "train.max_steps=3")  # checkpoints at steps 2 and 3
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [1, 2, 3]
    for r in first:  # competition on every step: its losses are there
        assert {"aux/distill", "aux/diversity"} <= r.keys() and 0 < r["lm_loss"] < 20
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 896 and config["text_config"]["vocab_size"] >= 151936
    assert config["text_config"]["llava_smoe_moe"]["layers"] == [1, 3]
    assert config["vision_config"]["hf_config"]["hidden_size"] == 1024

    shutil.rmtree(out / "checkpoints" / "step-00000003")  # as if the run died after step 2's save
    resumed = run(data, out, "train.max_steps=3", "train.resume=auto")
    assert "at step 2" in resumed.stdout + resumed.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["loss"] == pytest.approx(first[2]["loss"], rel=1e-6)
    assert (out / "checkpoints" / "step-00000003").is_dir()
