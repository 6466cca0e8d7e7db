"""Expert parallelism on 2 and 4 gloo processes: the sharded MoE layer computes what one process
computes, an expert (or a rank) without tokens hangs nothing, and EP x DP training repeats the
single-process losses, resumed runs included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_smoe.config import ConfigError, parse
from llava_smoe.training.config import TrainConfig
from llava_smoe.training.distributed import free_port
from test_training_distributed import losses, train

ROOT = Path(__file__).resolve().parents[1]


def test_expert_parallel_config_is_checked():
    with pytest.raises(ConfigError, match="expert_parallel: must be >= 1"):
        parse(TrainConfig, {"output_dir": "x", "max_steps": 1, "expert_parallel": 0})
    with pytest.raises(ConfigError, match="expert_parallel: needs train.backend=torch"):
        parse(TrainConfig, {"output_dir": "x", "max_steps": 1, "expert_parallel": 2, "backend": "deepspeed",
                            "deepspeed_config": "train/deepspeed/zero3.json"})


def _cases(world: int, sizes: list[int]) -> int:
    """Check lines tests/ep_layer_check.py prints: per EP size and rank, every case whose experts
    split evenly (MoT has 4), plus two skewed runs and one with an empty rank."""
    per_rank = {4: 7 + 3, 2: 7 + 3}  # 7 cases (4 experts or 8), 3 special runs
    return sum(per_rank[ep] * world for ep in sizes)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world,sizes", [(2, [2]), (4, [4, 2])])
def test_sharded_layer_matches_single_process(tmp_path, world, sizes):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "tests" / "ep_layer_check.py"), str(tmp_path),
           ",".join(map(str, sizes))]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = [line for r in range(world) for line in (tmp_path / f"rank-{r}.jsonl").read_text().splitlines()]
    assert len(lines) == _cases(world, sizes), lines
    assert any('"skewed": true' in line and '"tokens_per_expert": [0.0, 0.0' in line for line in lines)
    assert any('"empty_rank": true' in line and '"tokens": 0' in line for line in lines)


COMPETITION = ["toy.moe.router=competesmoe", "toy.moe.router_options={warmup_fraction: 0.0, competition_prob: 1.0, "
               "balance_coef: 0.0, z_loss_coef: 0.0, distill_coef: 0.0, diversity_coef: 0.0, "
               "competition_balance_coef: 0.0}"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict[str, list[float]]]:
    """One process, the whole global batch, for each router."""
    out = {}
    for name, extra in (("smoe", []), ("competition", COMPETITION)):
        run = train(tmp_path_factory.mktemp(name), "one", 1, "train.micro_batch_size=4", *extra)
        out[name] = {"loss": losses(run), "grad_norm": losses(run, "grad_norm")}
        assert len(out[name]["loss"]) >= 2 and len(out[name]["grad_norm"]) == len(out[name]["loss"]), out[name]
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world,ep,router", [(2, 2, "smoe"), (4, 2, "smoe"), (4, 2, "competition"), (4, 4, "smoe")])
def test_expert_parallel_training_matches_one_process(tmp_path, references, world, ep, router):
    """EP x DP (world / ep data-parallel replicas of each shard): the losses and gradient norms
    of one process seeing the whole batch."""
    micro = {2: "2", 4: "1"}[world]  # 8 samples per step, as the reference's 4 x 2
    out = train(tmp_path, "ep", world, f"train.expert_parallel={ep}", f"train.micro_batch_size={micro}",
                *(COMPETITION if router == "competition" else []))
    assert losses(out) == pytest.approx(references[router]["loss"], abs=1e-5)
    assert losses(out, "grad_norm") == pytest.approx(references[router]["grad_norm"], rel=1e-4)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_resume_matches_uninterrupted(tmp_path, references):
    """Checkpoints hold the gathered experts and each rank's optimizer state: resuming at step 2
    repeats steps 3-4."""
    out = train(tmp_path, "run", 2, "train.expert_parallel=2")
    first = losses(out)
    assert sorted(p.name for p in (out / "checkpoints" / "step-00000002").iterdir() if "optimizer" in p.name) == \
        ["optimizer-rank-00000.pt", "optimizer-rank-00001.pt"]
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    train(tmp_path, "run", 2, "train.expert_parallel=2", "train.resume=auto")
    assert losses(out) == pytest.approx(first, abs=1e-6)
    assert first == pytest.approx(references["smoe"]["loss"], abs=1e-5)
