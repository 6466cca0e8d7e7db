"""The planner's arithmetic on small cases, checked by hand and against built models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from llava_smoe.config import ConfigError, parse
from llava_smoe.model import build_model
from llava_smoe.moe import MoEConfig, MoELayer, configure_moe_schedule
from llava_smoe.moe.routers.competesmoe import competing_layers
from llava_smoe.plan import plan_recipe
from llava_smoe.plan.estimate import (
    StateBytes,
    _moe_shape,
    competition_tensors,
    expected_competing_layers,
    model_states,
    moe_saved_per_token,
)
from llava_smoe.tasks.vlm import VLMTaskConfig, apply_checkpoint_stage
from llava_smoe.testing.tiny import tiny_model_config
from llava_smoe.training.config import OptimConfig
from llava_smoe.training.optim import build_param_groups

ROOT = Path(__file__).resolve().parents[1]
MOE = {"router": "competesmoe", "num_experts": 4, "top_k": 2}
STAGE2_GROUPS = [{"name": "moe", "patterns": ["projector.*", "language_model.*.mlp.*"], "lr": 1e-4}]


def write_stages(tmp_path: Path) -> Path:
    """A new assembly (stage 1) and an upcycling stage that starts from its `final`."""
    out1 = tmp_path / "runs" / "stage1"
    stage1 = {"task": "vlm",
              "vlm": {"data": "unused.json", "tokenizer": "unused-tokenizer", "model": tiny_model_config()},
              "train": {"output_dir": str(out1), "max_steps": 1},
              "optim": {"groups": [{"name": "projector", "patterns": ["projector.*"], "lr": 1e-3}]}}
    stage2 = {"task": "vlm",
              "vlm": {"data": "unused.json", "init_from": str(out1 / "final"), "moe": MOE,
                      "moe_placement": {"language_model": "every_other"}},
              "train": {"output_dir": str(tmp_path / "runs" / "stage2"), "max_steps": 1, "micro_batch_size": 2},
              "optim": {"groups": STAGE2_GROUPS}}
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(stage1))
    (tmp_path / "stage2.yaml").write_text(yaml.safe_dump(stage2))
    return tmp_path / "stage2.yaml"


def tiny_by_hand() -> dict[str, int]:
    """Parameters of tiny_model_config() upcycled as stage 2 does, counted from its dimensions."""
    Dv, Fv, Lv, patches = 32, 64, 3, 16  # CLIP vision: 32 px / 8 px patches
    vision = Dv + 3 * 8 * 8 * Dv + (patches + 1) * Dv + 2 * Dv  # CLS, patch conv, positions, pre-LN
    vision += Lv * (2 * 2 * Dv + 4 * (Dv * Dv + Dv) + (Dv * Fv + Fv) + (Fv * Dv + Dv)) + 2 * Dv
    projector = (Dv * 32 + 32) + (32 * 32 + 32)
    D, F, L, V, q, kv, E = 32, 64, 4, 96, 32, 16, 4  # Qwen2: q/k/v biases, GQA with 2 of 4 heads
    attention = L * ((D * q + q) + 2 * (D * kv + kv) + q * D)
    norms = L * 2 * D + D
    moe_layers = [1, 3]
    dense = (L - len(moe_layers)) * 3 * D * F
    experts = len(moe_layers) * E * 3 * D * F
    routers = len(moe_layers) * E * D
    return {"vision_tower": vision, "projector": projector, "language_model: attention": attention,
            "language_model: norms": norms, "language_model: dense FFN": dense,
            "language_model: routed experts": experts, "language_model: routers": routers,
            "language_model: embeddings": V * D, "language_model: output layer": V * D}


def test_parameters_follow_the_stages_and_equal_the_built_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_recipe(write_stages(tmp_path), gpus=2, gpu_memory_gb=16)
    assert plan["chain"] == ["stage1.yaml", "stage2.yaml"]
    components = {c["name"]: c for c in plan["parameters"]["components"]}
    assert {k: c["total"] for k, c in components.items()} == tiny_by_hand()
    experts = tiny_by_hand()["language_model: routed experts"]
    assert plan["parameters"]["active"] == plan["parameters"]["total"] - experts // 2  # top-2 of 4

    # The model the vlm task builds for these stages: same count, same trainable set.
    model = build_model(tiny_model_config())
    apply_checkpoint_stage(model, parse(VLMTaskConfig, {"data": "x", "init_from": "x", "moe": MOE}))
    build_param_groups(model, parse(OptimConfig, {"groups": STAGE2_GROUPS}))
    assert plan["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert plan["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_states_shard_as_zero_says():
    sb = StateBytes(2, 2, 12)  # DeepSpeed bf16
    z = {"reduce_bucket_size": 100.0, "allgather_bucket_size": 50.0, "stage3_max_live_parameters": 1e9,
         "stage3_max_reuse_distance": 0.0}
    none = model_states(1000, 600, 4, "none", sb, zero_config=z)
    assert (none.weights, none.gradients, none.optimizer) == (2000, 1200, 7200)
    zero2 = model_states(1000, 600, 4, "zero2", sb, zero_config=z)
    assert (zero2.weights, zero2.gradients, zero2.optimizer, zero2.buckets) == (2000, 300, 1800, 2 * 100 + 2 * 50)
    zero3 = model_states(1000, 600, 4, "zero3", sb, largest_block=70, zero_config=z)
    assert (zero3.weights, zero3.gradients, zero3.optimizer) == (500, 300, 1800)
    assert zero3.gathered == 2 * 2 * 70 and zero3.buckets == 2 * 100
    # Parameters reused within the reuse distance stay gathered; never more than the model.
    kept = model_states(1000, 600, 4, "zero3", sb, largest_block=70, zero_config={**z, "stage3_max_reuse_distance": 1e9})
    assert kept.gathered == 2 * 1000
    # Expert parallelism shards the experts' weights, gradients and optimizer state.
    ep = model_states(1000, 600, 4, "none", StateBytes(4, 4, 8), expert_params=400, expert_trainable=400,
                      expert_parallel=2)
    assert (ep.weights, ep.gradients, ep.optimizer) == (4 * 800, 4 * 400, 8 * 400)


@pytest.mark.parametrize("competing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_activations_are_what_autograd_keeps(competing, dtype):
    """The planned bytes per token of an MoE layer against the tensors autograd actually saves
    (its parameters and its input excluded), router step and competition step."""
    T, D, F = 256, 64, 96
    options = {"warmup_fraction": 0.0, "competition_prob": 1.0 if competing else 0.0}
    layer = MoELayer(MoEConfig(router="competesmoe", num_experts=4, top_k=2, router_options=options), D, F).to(dtype)
    configure_moe_schedule(layer, 10)
    layer.train()
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    skip = {p.untyped_storage().data_ptr() for p in (*layer.parameters(), x)}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    assert (layer.router.stats.get("competition_forwards") is not None) == competing
    planned = moe_saved_per_token(_moe_shape(layer, "language_model", 0), dtype.itemsize, competing) * T
    assert planned == pytest.approx(sum(saved.values()), rel=0.05)


def test_competition_tensor_sizes():
    with torch.device("meta"):
        m = _moe_shape(MoELayer(MoEConfig(router="competesmoe", num_experts=4, top_k=2), 3072, 8192),
                       "language_model", 1)
    t = competition_tensors(m, tokens=16 * 2048, b=2)
    assert t["shape_TED"] == [32768, 4, 3072] and t["shape_TEF2"] == [32768, 4, 16384]
    assert t["outputs_TED"] == 32768 * 4 * 3072 * 2 and t["hidden_TEF2"] == 32768 * 4 * 16384 * 2


def test_expected_competing_layers_matches_the_schedule():
    assert expected_competing_layers(2, 0.5, 1, 0.0) == pytest.approx(0.75)  # P(at least one of two)
    assert expected_competing_layers(2, 0.5, 2, 0.5) == pytest.approx(0.5)  # half the run warms up
    # The schedule itself, counted over many steps: 16 layers, p = 0.05, at most 3, 5% warm-up.
    steps = 4000
    drawn = sum(len(competing_layers(0, s, 16, steps, 0.05, 0.05, 3)) for s in range(steps))
    expected = expected_competing_layers(16, 0.05, 3, 0.05)
    assert drawn / steps == pytest.approx(expected, abs=4 * math.sqrt(expected / steps))


def test_unknown_hub_id_and_missing_stage_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_stages(tmp_path)
    data = yaml.safe_load((tmp_path / "stage1.yaml").read_text())
    data["vlm"]["model"]["language_model"] = {"name_or_path": "someone/unknown-lm"}
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"vlm\.model\.language_model\.name_or_path: 'someone/unknown-lm' is not a "
                                          r"local folder and no architecture file describes it"):
        plan_recipe(recipe, gpus=1, gpu_memory_gb=16)
    (tmp_path / "stage1.yaml").unlink()
    with pytest.raises(ConfigError, match=r"vlm\.init_from: .*stage1/final holds no checkpoint and no recipe"):
        plan_recipe(recipe, gpus=1, gpu_memory_gb=16)


def test_cli_plan_reports_and_rejects_bad_flags(tmp_path, monkeypatch, capsys):
    from llava_smoe.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = str(write_stages(tmp_path))
    assert main(["plan", recipe, "--gpus", "2", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3" in out and "largest micro-batch that fits" in out
    assert main(["plan", recipe, "--gpus", "0", "--gpu-memory", "16"]) == 2
    assert capsys.readouterr().err.strip() == "error: --gpus must be >= 1, got 0"


def test_llava15_moe_stage_plans_without_weights():
    """train/llava15/moe.yaml names only init_from: the chain leads to the hub ids of stage 1,
    read from the architecture files (CLIP-L/336 + Phi-3.5-mini, 16 of 32 layers upcycled)."""
    plan = plan_recipe(ROOT / "train/llava15/moe.yaml", gpus=8, gpu_memory_gb=80)
    assert [Path(p).name for p in plan["chain"]] == ["pretrain.yaml", "finetune.yaml", "moe.yaml"]
    c = {c["name"]: c for c in plan["parameters"]["components"]}
    assert c["language_model: routed experts"]["total"] == 16 * 4 * 3 * 3072 * 8192
    assert c["vision_tower"]["trainable"] == 0 and c["language_model: attention"]["trainable"] == 0
    zero3 = next(r for r in plan["fit"] if r["stage"] == "zero3" and r["checkpointing"])
    assert zero3["recipe_fits"]
