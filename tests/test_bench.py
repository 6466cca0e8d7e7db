import json

import pytest
import torch

from llava_smoe.bench import MoEBenchConfig, build_hf_block, check_hf_equivalence
from llava_smoe.cli import main
from llava_smoe.moe import MoEConfig, MoELayer, available_routers

TINY = ["--experts", "4", "--top-k", "2", "--hidden", "32", "--ffn", "64", "--tokens", "64", "--batch", "4",
        "--repeats", "1", "--warmup", "0"]


def test_bench_moe_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "moe", "--out", str(out), *TINY]) == 0
    rows = json.loads(out.read_text())
    by_router = {r["router"]: r for r in rows}
    expected = {"dense", "hf", "competesmoe-competition", "smoe-loop", *available_routers()}
    assert set(by_router) == expected and len(rows) == len(expected)
    for r in rows:
        for key in ("ms", "ms_p25", "ms_p75", "ms_min", "ms_max", "ratio_to_dense", "ratio_to_hf"):
            assert r[key] > 0, (r["router"], key)
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert (r["num_experts"], r["top_k"], r["hidden_size"], r["ffn_size"], r["tokens"]) == (4, 2, 32, 64, 64)
    assert by_router["dense"]["ratio_to_dense"] == pytest.approx(1.0)
    assert by_router["hf"]["ratio_to_hf"] == pytest.approx(1.0)
    check = by_router["hf"]["equivalence"]
    assert check["passed"] and check["reference"] == "smoe"
    assert check["max_abs_diff_output"] < 1e-5 and check["max_abs_diff_input_grad"] < 1e-5
    printed = capsys.readouterr().out
    assert "| router |" in printed and "| competesmoe-competition |" in printed


def test_hf_block_with_our_weights_matches_smoe_and_mismatch_is_caught():
    smoe = MoELayer(MoEConfig(num_experts=4, top_k=2, router="smoe"), 16, 32).train()
    hf = build_hf_block(smoe, "eager").train()
    x, g = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    assert check_hf_equivalence(smoe, hf, x, g)["passed"]
    with torch.no_grad():
        hf.experts.down_proj[1].mul_(1.5)  # one expert's weights no longer agree
    with pytest.raises(AssertionError, match="outputs differ"):
        check_hf_equivalence(smoe, hf, x, g)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"tokens": 63, "batch": 4}, "divisible by batch"),
        ({"routers": ["nope"]}, "registered routers"),
        ({"dtype": "int8"}, "dtype"),
        ({"top_k": 5, "num_experts": 4}, "exceeds"),
    ],
)
def test_bench_config_rejects_bad_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        MoEBenchConfig(**fields)


def test_mot_batch_not_divisible_by_group_size_is_rejected():
    with pytest.raises(ValueError, match="group_size"):
        MoEBenchConfig(tokens=64, batch=2, routers=["mot"])
