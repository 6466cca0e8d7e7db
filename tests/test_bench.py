import json

import pytest
import torch

from llava_smoe.bench.moe import MoEBenchConfig, build_hf_block, check_hf_equivalence
from llava_smoe.cli import main
from llava_smoe.moe import MoEConfig, MoELayer, available_routers

TINY = ["--experts", "4", "--top-k", "2", "--hidden", "32", "--ffn", "64", "--tokens", "64", "--batch", "4",
        "--repeats", "1", "--warmup", "0"]


def test_bench_moe_cli_writes_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "moe", "--out", str(out), *TINY]) == 0
    rows = json.loads(out.read_text())
    by_router = {r["router"]: r for r in rows}
    expected = {"dense", "dense-fused", "hf", "competesmoe-competition", "smoe-loop", *available_routers()}
    assert set(by_router) == expected and len(rows) == len(expected)
    for r in rows:
        for key in ("ms", "ms_p25", "ms_p75", "ms_min", "ms_max", "ratio_to_dense", "ratio_to_hf"):
            assert r[key] > 0, (r["router"], key)
        assert r["ms_min"] <= r["ms"] <= r["ms_max"]
        lo, hi = r["ratio_to_dense_ci95"]
        assert lo <= r["ratio_to_dense_p25"] <= r["ratio_to_dense"] <= r["ratio_to_dense_p75"] <= hi
        assert (r["num_experts"], r["top_k"], r["hidden_size"], r["ffn_size"], r["tokens"]) == (4, 2, 32, 64, 64)
    assert by_router["dense"]["ratio_to_dense"] == pytest.approx(1.0)
    assert by_router["hf"]["ratio_to_hf"] == pytest.approx(1.0)
    check = by_router["hf"]["equivalence"]
    assert check["passed"] and check["reference"] == "smoe"
    assert check["max_abs_diff_output"] < 1e-5 and check["max_abs_diff_input_grad"] < 1e-5
    printed = capsys.readouterr().out
    assert "| router |" in printed and "| competesmoe-competition |" in printed


def test_median_interval_is_the_binomial_order_statistics():
    from llava_smoe.bench.moe import median_interval

    values = [float(v) for v in range(12)]
    # n = 12: P(X <= 2) = 79/4096 = 0.019 <= 0.025 < P(X <= 3) = 299/4096, so the 3rd and 10th values.
    assert median_interval(values) == (2.0, 9.0)
    assert median_interval(values[:6]) == (0.0, 5.0)  # P(X <= 0) = 1/64 <= 0.025
    assert median_interval(values[:5]) == (0.0, 4.0)  # the whole range: no narrower interval exists


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


def test_bench_adamw_cli_compares_fused_with_the_loop(tmp_path, capsys):
    out = tmp_path / "adamw.json"
    assert main(["bench", "adamw", "--out", str(out), "--hidden", "16", "--ffn", "32", "--layers", "2",
                 "--vocab", "40", "--steps", "2", "--repeats", "2"]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"loop", "fused"} and rows["loop"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert rows["fused"]["tensors"] == 2 + 2 * 9 and all(r["ms_per_step"] > 0 for r in rows.values())
    assert "| fused |" in capsys.readouterr().out


def test_bench_data_cli_compares_cached_with_uncached(tmp_path, capsys):
    from PIL import Image

    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
        train_bpe_tokenizer,
    )

    tok = train_bpe_tokenizer(["What color is it? red blue"] * 10, vocab_size=300)
    LlavaSmoeProcessor(tok, ProcessorConfig(template="chatml", num_image_tokens=4,
                                            image=ImageProcessingConfig(image_size=8))).save_pretrained(tmp_path / "proc")
    (tmp_path / "images").mkdir()
    records = []
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "data_bench.json"
    assert main(["bench", "data", "--out", str(out), "--data", str(tmp_path / "data.json"),
                 "--image-folder", str(tmp_path / "images"), "--processor", str(tmp_path / "proc"),
                 "--epochs", "2", "--batch", "4", "--repeats", "1"]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"uncached", "cached"} and rows["uncached"]["ratio_to_baseline"] == pytest.approx(1.0)
    assert all(r["ms_per_batch"] > 0 and r["epochs"] == 2 for r in rows.values())
    assert "| cached |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_baseline_trains_the_cnn_anchor_and_scores_every_type(tmp_path, capsys):
    from llava_smoe.cli import main
    from llava_smoe.data.worlds import WorldConfig, generate_world

    generate_world(WorldConfig(world="single", seed=0, num_train=800, num_val=80, num_test=80), tmp_path)
    out = tmp_path / "baseline.json"
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"accuracy": 0.5, "blind_accuracy": 0.4, "accuracy_by_type": {"color": 0.5},
                                   "blind_accuracy_by_type": {"color": 0.1}}))
    assert main(["bench", "baseline", "--train", str(tmp_path / "instruct_train.json"), "--test",
                 str(tmp_path / "instruct_test.json"), "--val", str(tmp_path / "instruct_val.json"), "--image-folder",
                 str(tmp_path / "images"), "--summary", str(summary), "--out", str(out), "--threads", "1",
                 "--max-epochs", "12"]) == 0
    (result,) = json.loads(out.read_text())
    assert result["num_questions"] == 80 and 1 <= result["epochs"] <= 12
    assert set(result["accuracy_by_type"]) == {"color", "shape", "yes_color", "yes_shape"}
    assert 0.0 <= result["blind_accuracy"] <= 1.0 and result["summaries"][0]["accuracy"] == 0.5
    # it reads the image: well above what it answers with a blank one
    assert result["accuracy"] > result["blind_accuracy"] + 0.15
    assert "| color | " in capsys.readouterr().out


def test_serve_workload_is_fixed_by_its_seed():
    from llava_smoe.bench.serve import ServeBenchConfig, build_workload

    cfg = ServeBenchConfig(streams=40, seed=3)
    a, b = build_workload(cfg), build_workload(cfg)
    assert [(r.arrival_s, r.text, r.image_png, r.max_tokens) for r in a] == \
           [(r.arrival_s, r.text, r.image_png, r.max_tokens) for r in b]
    assert a[0].arrival_s == 0 and all(x.arrival_s < y.arrival_s for x, y in zip(a, a[1:]))  # staggered
    assert all(cfg.output_tokens_min <= r.max_tokens <= cfg.output_tokens_max for r in a)
    assert len({r.max_tokens for r in a}) > 10 and 0 < sum(r.image_png is not None for r in a) < len(a)
    assert [r.max_tokens for r in build_workload(ServeBenchConfig(streams=40, seed=4))] != [r.max_tokens for r in a]
    with pytest.raises(ValueError, match="arrival_rate"):
        ServeBenchConfig(arrival_rate=0)


@pytest.mark.slow
def test_bench_serve_cli_runs_both_modes_over_http(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--out", str(out), "--streams", "6", "--rounds", "1", "--rate", "50"]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["static", "continuous"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["latency_p50_s"] <= r["latency_p95_s"] and r["ttft_p50_s"] > 0
        assert 1 <= r["tokens_per_step"] <= 8  # at most max_batch_size rows per step (prefills add a little)
        assert r["completion_tokens"] == rows[0]["completion_tokens"]  # the same workload for both
    assert rows[1]["tokens_per_s_ratio_to_static"] > 0
    assert "| continuous |" in capsys.readouterr().out
