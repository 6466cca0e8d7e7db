"""scripts/gpu_check.sh --smoke: every section of the GPU check runs at tiny sizes (on the CPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(out)], cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("found: python ")  # versions first
    result = json.loads(out.read_text())
    moe = [r for r in result["rows"] if r["section"] == "moe"]
    assert {(r["num_experts"], r["variant"]) for r in moe} == {
        (e, v) for e in (4, 8) for v in ("dense", "smoe", "transformers grouped_mm", "competesmoe competition")}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in moe)
    dense = {r["num_experts"]: r["tflops"] for r in moe if r["variant"] == "dense"}
    for r in moe:  # the ratio the aim is judged by: this variant's FLOP/s over dense's, same E
        assert r["flops_ratio_to_dense"] == pytest.approx(r["tflops"] / dense[r["num_experts"]], rel=0.02)
    train = next(r for r in result["rows"] if r["section"] == "train")
    assert train["tokens_per_s"] > 0 and train["model_tflops"] > 0 and train["mfu"] is None  # no peak known on CPU
    generate = next(r for r in result["rows"] if r["section"] == "generate")
    assert generate["decode_tokens_per_s"] > 0
