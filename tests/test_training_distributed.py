"""Two CPU processes (torchrun, gloo) train like one: DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Sequences have 4 to 12 tokens, so micro-batches and ranks hold different numbers of supervised
tokens: the loss is the mean over the step's tokens, and how the step is split (processes,
micro-batches, accumulation) must not change it. Dropout and MoE aux losses are off: both depend
on how the batch is split (a load-balancing loss over half a batch is not half the loss over the
whole); everything else must agree to float rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_smoe.training.distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {
    "task": "toy",
    "toy": {
        "num_train": 64,
        "num_eval": 8,
        "hidden_size": 32,
        "seq_len": 12,
        "min_seq_len": 4,
        "dropout": 0.0,
        "moe": {"num_experts": 4, "top_k": 2, "router": "smoe",
                "router_options": {"balance_coef": 0.0, "z_loss_coef": 0.0}},
    },
    "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32", "log_every": 1,
              "save_every": 2, "tensorboard": False, "progress_bar": False},
    "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": 1.0e-2}], "warmup_ratio": 0.0},
}


def train(tmp_path: Path, name: str, nproc: int, *overrides: str, timeout: int = 400) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "llava_smoe.cli", "train", str(recipe),
           f"train.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


def losses(out: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[float]]:
    """One process seeing the whole global batch (micro-batch 4 instead of 2 x 2 ranks)."""
    out = train(tmp_path_factory.mktemp("one"), "one", 1, "train.micro_batch_size=4")
    result = {"loss": losses(out), "grad_norm": losses(out, "grad_norm")}
    assert len(result["loss"]) == 4 and result["loss"][-1] < result["loss"][0]
    return result


BACKENDS = {
    "ddp": ["train.backend=torch"],
    "zero2": ["train.backend=deepspeed", "train.deepspeed_config=train/deepspeed/zero2.json"],
    "zero3": ["train.backend=deepspeed", "train.deepspeed_config=train/deepspeed/zero3.json"],
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_two_processes_match_one(tmp_path, reference, backend):
    out = train(tmp_path, "two", 2, *BACKENDS[backend])
    assert losses(out) == pytest.approx(reference["loss"], abs=1e-5)
    assert losses(out, "grad_norm") == pytest.approx(reference["grad_norm"], rel=1e-4)
    assert (out / "checkpoints" / "step-00000004" / "model.safetensors").is_file()
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_accumulating_single_sequences_matches_one_micro_batch(tmp_path, reference, backend):
    """Micro-batch 1 x accumulation 8 on one process: the same steps as micro-batch 4 x 2."""
    out = train(tmp_path, "accumulated", 1, *BACKENDS[backend], "train.micro_batch_size=1", "train.grad_accum=8")
    assert losses(out) == pytest.approx(reference["loss"], abs=1e-5)
    assert losses(out, "grad_norm") == pytest.approx(reference["grad_norm"], rel=1e-4)


def test_zero3_resume_matches_uninterrupted(tmp_path, reference):
    """Resume from a ZeRO-3 checkpoint at step 2: steps 3-4 repeat the uninterrupted losses."""
    ds = ["train.backend=deepspeed", "train.deepspeed_config=train/deepspeed/zero3.json"]
    out = train(tmp_path, "run", 2, *ds, "train.max_steps=4")
    first = losses(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if the run died after step 2's save
    train(tmp_path, "run", 2, *ds, "train.resume=auto")
    assert losses(out) == pytest.approx(first, abs=1e-6)
    assert first == pytest.approx(reference["loss"], abs=1e-5)


POISONED_RUN = """
import sys
from llava_smoe.training.recipe import load_recipe
from llava_smoe.testing.toy import ToyLM
from llava_smoe.training.trainer import train

real_forward = ToyLM.forward
calls = {"n": 0}

def forward(self, *args, **kwargs):
    out = real_forward(self, *args, **kwargs)
    calls["n"] += 1
    if self.training and calls["n"] == 3:  # grad_accum 2: the last micro-batch of step 2
        out.loss = out.loss * float("nan")
    return out

ToyLM.forward = forward
result = train(load_recipe(sys.argv[1], sys.argv[2:]))
sys.exit(0 if result.status == "completed" else 1)
"""


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_skips_nonfinite_step_like_torch(tmp_path, stage):
    """A skipped step under ZeRO discards that step's gradients exactly as the torch back end does."""
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED_RUN)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    outs = {}
    for name, extra in (("torch", []), (stage, ["train.backend=deepspeed",
                                                 f"train.deepspeed_config=train/deepspeed/{stage}.json"])):
        outs[name] = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(script), str(recipe), f"train.output_dir={outs[name]}",
               "toy.num_eval=0", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
        assert "step 2: non-finite loss=nan" in proc.stdout
    records = [json.loads(line) for line in (outs[stage] / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in records] == [0, 1, 1, 1] and "loss" not in records[1]
    assert losses(outs[stage]) == pytest.approx(losses(outs["torch"]), abs=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_competesmoe_trains_on_two_processes(tmp_path, backend):
    """On a competition step the router is reached only through its distillation loss, an aux loss:
    data parallelism must see it as used (DDP looking for unused parameters otherwise finds the
    router unused, then receives its gradient, and stops)."""
    competition_every_step = ["toy.moe.router=competesmoe", "toy.moe.router_options.competition_prob=1.0",
                              "toy.moe.router_options.warmup_fraction=0.0"]
    out = train(tmp_path, "two", 2, *BACKENDS[backend], *competition_every_step)
    assert len(losses(out)) == 4
    assert all(d > 0 for d in losses(out, "aux/distill"))
    assert (out / "final" / "model.safetensors").is_file()
