"""Training engine on the tiny `toy` task, one CPU process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_model

from llava_smoe.config import ConfigError
from llava_smoe.testing.toy import ToyLM, ToyTaskConfig
from llava_smoe.training import cli as train_cli
from llava_smoe.training import trainer as trainer_mod
from llava_smoe.training.backends import TorchBackend
from llava_smoe.training.checkpoint import (
    checkpoint_root,
    list_checkpoints,
    read_state,
    resolve_resume,
)
from llava_smoe.training.data import ResumableSampler, ShardedEvalSampler
from llava_smoe.training.optim import (
    WarmupCosineSchedule,
    build_optimizer,
    build_param_groups,
)
from llava_smoe.training.recipe import load_recipe

RECIPE = {
    "task": "toy",
    "toy": {"num_train": 64, "num_eval": 16, "hidden_size": 32, "seq_len": 12, "dropout": 0.1},
    "train": {
        "output_dir": "OUT",
        "max_steps": 6,
        "micro_batch_size": 4,
        "grad_accum": 2,
        "precision": "fp32",
        "log_every": 1,
        "tensorboard": False,
        "progress_bar": False,
    },
    "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": 1.0e-2}], "warmup_ratio": 0.2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_recipe(tmp_path: Path, data: dict | None = None, name: str = "recipe.yaml") -> Path:
    data = json.loads(json.dumps(data or RECIPE))
    data.get("train", {}).setdefault("output_dir", "OUT")
    if data.get("train", {}).get("output_dir") == "OUT":
        data["train"]["output_dir"] = str(tmp_path / "out")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run_toy(tmp_path: Path, *overrides: str):
    return trainer_mod.train(load_recipe(write_recipe(tmp_path), list(overrides)))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


# -- recipes --------------------------------------------------------------------------------------


def test_recipe_overrides_are_yaml_scalars_and_index_lists(tmp_path):
    run = load_recipe(write_recipe(tmp_path), ["train.max_steps=11", "optim.groups.0.lr=5e-4",
                                               "train.precision=bf16", "toy.moe=null", "optim.betas=[0.9,0.95]"])
    assert run.train.max_steps == 11
    assert run.optim.groups[0].lr == pytest.approx(5e-4)  # PyYAML reads 5e-4 as a string: coerced
    assert run.train.precision == "bf16"
    assert run.task_config.moe is None
    assert run.optim.betas == (0.9, 0.95)


def test_recipe_unknown_key_names_key_and_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_stpes.*valid keys: .*max_steps"):
        load_recipe(write_recipe(tmp_path), ["train.max_stpes=3"])
    with pytest.raises(ConfigError, match=r"optim\.groups\.0\.lrr"):
        load_recipe(write_recipe(tmp_path), ["optim.groups.0.lrr=3"])
    with pytest.raises(ConfigError, match="unknown key.*trian"):
        load_recipe(write_recipe(tmp_path), ["trian.seed=3"])
    with pytest.raises(ConfigError, match="not one of"):
        load_recipe(write_recipe(tmp_path), ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="exactly one of max_steps or epochs"):
        load_recipe(write_recipe(tmp_path), ["train.epochs=1"])


def test_task_section_is_validated_by_the_task(tmp_path):
    with pytest.raises(ConfigError, match=r"toy\.hiden_size.*hidden_size"):  # when the recipe loads
        load_recipe(write_recipe(tmp_path), ["toy.hiden_size=8"])
    with pytest.raises(ConfigError, match=r"toy\.hidden_size: 30 must be divisible by num_heads=4"):
        load_recipe(write_recipe(tmp_path), ["toy.hidden_size=30", "toy.num_heads=4"])


def test_recipe_base_inheritance_merges_dicts(tmp_path):
    base_path = write_recipe(tmp_path, name="base.yaml")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "../base.yaml", "train": {"seed": 7}, "toy": {"num_layers": 3}}))
    run = load_recipe(child)
    assert run.train.seed == 7 and run.train.max_steps == 6  # merged, not replaced
    assert run.task_config.num_layers == 3 and run.task_config.hidden_size == 32
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"base": "loop.yaml"}))
    with pytest.raises(ConfigError, match="loops"):
        load_recipe(loop)
    assert base_path.is_file()


# -- pieces ---------------------------------------------------------------------------------------


def test_sampler_resumes_mid_epoch_and_shards_ranks():
    s = ResumableSampler(10, seed=3)
    full = list(s)
    s.set_position(0, 4)
    assert list(s) == full[4:]
    s.set_position(1, 0)
    assert sorted(list(s)) == list(range(10)) and list(s) != full
    shards = [ResumableSampler(10, seed=3, rank=r, world_size=3).order(0) for r in range(3)]
    assert sum(shards, []) and len(set(sum(shards, []))) == 9 and all(len(x) == 3 for x in shards)
    assert sum((ShardedEvalSampler(7, r, 2).indices for r in range(2)), []) == [0, 2, 4, 1, 3, 5]


def test_schedule_warms_up_then_decays_to_min():
    sched = WarmupCosineSchedule(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    f = [sched.factor(s) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_fused_adamw_where_it_runs_and_same_steps_as_the_loop(tmp_path):
    run = load_recipe(write_recipe(tmp_path), [])
    models = {}
    for fused in (None, False):
        torch.manual_seed(0)
        model = ToyLM(ToyTaskConfig(hidden_size=16, moe=None))
        run.optim.fused = fused
        opt = build_optimizer(build_param_groups(model, run.optim)[0], run.optim)
        assert opt.defaults["fused"] is (fused is None)  # auto: CPU float parameters take the fused kernel
        for step in range(3):
            torch.manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        models[fused] = model
    for a, b in zip(models[None].parameters(), models[False].parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the same update, up to rounding


def test_param_groups_freeze_unmatched_and_reject_empty_groups(tmp_path):
    run = load_recipe(write_recipe(tmp_path), [])
    model = ToyLM(ToyTaskConfig(hidden_size=16, moe=None))
    run.optim.groups[0].patterns = ["blocks.*"]
    groups, summary, frozen = build_param_groups(model, run.optim)
    outside = [model.embed.weight, model.pos.weight, *model.norm.parameters()]
    assert frozen == sum(p.numel() for p in outside)
    assert not model.embed.weight.requires_grad and model.blocks[0].qkv.weight.requires_grad
    assert summary[0].parameters == sum(p.numel() for p in model.blocks.parameters())
    run.optim.groups[0].patterns = ["vision.*"]
    with pytest.raises(ConfigError, match="match no parameter"):
        build_param_groups(model, run.optim)


def test_param_groups_never_unfreeze_what_the_model_froze(tmp_path):
    run = load_recipe(write_recipe(tmp_path), [])
    model = ToyLM(ToyTaskConfig(hidden_size=16, moe=None))
    model.embed.weight.requires_grad_(False)  # as a tower with `freeze: true` is built
    run.optim.groups[0].patterns = ["*"]
    groups, _, frozen = build_param_groups(model, run.optim)
    assert frozen == model.embed.weight.numel() and not model.embed.weight.requires_grad
    assert all(p is not model.embed.weight for g in groups for p in g["params"])
    run.optim.groups[0].patterns = ["embed.*"]
    with pytest.raises(ConfigError, match="frozen by the model config"):
        build_param_groups(model, run.optim)


def test_grouping_by_length_needs_a_dataset_that_records_lengths(tmp_path):
    with pytest.raises(ConfigError, match="group_by_modality_length=true needs a dataset that records"):
        run_toy(tmp_path, "train.group_by_modality_length=true")


def test_mixture_of_tokens_micro_batch_is_validated(tmp_path):
    moe = {"num_experts": 4, "top_k": 2, "router": "mot", "router_options": {"group_size": 4}}
    with pytest.raises(ConfigError, match="micro_batch_size=6.*group"):
        run_toy(tmp_path, f"toy.moe={json.dumps(moe)}", "train.micro_batch_size=6")


# -- training runs --------------------------------------------------------------------------------


def test_end_to_end_loss_falls_and_everything_is_written(tmp_path):
    result = run_toy(tmp_path, "train.max_steps=24", "train.log_every=4", "train.tensorboard=true",
                     "train.save_every=8", "train.keep_last=2", "toy.dropout=0.0", "train.eval_every=12")
    out = tmp_path / "out"
    assert result.status == "completed" and result.step == 24
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    first = records[0]
    assert {"lm_loss", "aux/balance", "aux/z_loss", "lr", "lr/all", "tokens_per_s", "grad_norm"} <= set(first)
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["aux/balance"] + first["aux/z_loss"], rel=1e-5)
    assert any(k.startswith("routing/blocks.0.ffn/") for k in first) and "routing/all/load_cv" in first
    assert first["tokens_per_s"] > 0
    evals = [r["eval/loss"] for r in metrics(out) if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < 2.8
    assert [p.name for p in list_checkpoints(checkpoint_root(out))] == ["step-00000016", "step-00000024"]
    assert any((out / "tensorboard").iterdir())
    exported = ToyLM(ToyTaskConfig(**json.loads((out / "final" / "config.json").read_text())))
    load_model(exported, str(out / "final" / "model.safetensors"))
    assert exported.head.weight is exported.embed.weight


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, crash_at_step):
    common = ["train.max_steps=8", "train.save_every=4", "toy.dropout=0.2"]
    full = run_toy(tmp_path / "a", *common)
    assert full.status == "completed"
    expected = step_losses(tmp_path / "a" / "out")

    with crash_at_step(6), pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path / "b", *common)
    out_b = tmp_path / "b" / "out"
    assert max(step_losses(out_b)) == 5  # step 5 was logged before the crash, then dropped on resume
    resumed = run_toy(tmp_path / "b", *common, "train.resume=auto")
    assert resumed.status == "completed"
    got = step_losses(out_b)
    assert sorted(got) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = TorchBackend.save

    def save_then_crash(self, ckpt_dir):
        if ckpt_dir.name.endswith("00000004"):
            (ckpt_dir / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        real_save(self, ckpt_dir)

    monkeypatch.setattr(TorchBackend, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated"):
        run_toy(tmp_path, "train.max_steps=6", "train.save_every=2")
    root = checkpoint_root(tmp_path / "out")
    assert (root / ".tmp-step-00000004").is_dir()
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002"]
    latest = resolve_resume("auto", tmp_path / "out")
    assert latest.name == "step-00000002" and read_state(latest).step == 2
    load_model(ToyLM(ToyTaskConfig(**RECIPE["toy"])), str(latest / "model.safetensors"))

    monkeypatch.setattr(TorchBackend, "save", real_save)
    result = run_toy(tmp_path, "train.max_steps=6", "train.save_every=2", "train.resume=auto")
    assert result.status == "completed"
    assert not list(root.glob(".tmp-*"))
    assert [p.name for p in list_checkpoints(root)] == ["step-00000004", "step-00000006"]


def _poison_forward(monkeypatch, bad_calls):
    real_forward = ToyLM.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if self.training and bad_calls(calls["n"]):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(ToyLM, "forward", forward)


def test_nonfinite_step_is_skipped_without_update(tmp_path, monkeypatch, capsys):
    _poison_forward(monkeypatch, lambda n: n == 5)  # grad_accum 2: call 5 is in step 3
    result = run_toy(tmp_path, "train.max_steps=5", "toy.num_eval=0")
    assert result.status == "completed"
    assert "step 3: non-finite loss=nan, grad_norm=nan; step skipped" in capsys.readouterr().out
    records = metrics(tmp_path / "out")
    assert "loss" not in records[2] and records[2]["nonfinite"] == 1
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    weights = torch.load(result.checkpoint / "optimizer.pt", weights_only=True)
    assert all(torch.isfinite(v["exp_avg"]).all() for v in weights["state"].values())


def test_repeated_nonfinite_stops_cleanly(tmp_path, monkeypatch, capsys):
    _poison_forward(monkeypatch, lambda n: n >= 5)
    recipe = write_recipe(tmp_path)
    code = train_cli.run(_cli_args(recipe, ["train.max_steps=20", "train.max_nonfinite=3", "toy.num_eval=0"]))
    assert code == 1
    text = capsys.readouterr().out
    assert "stopped at step 5: 3 non-finite steps reached train.max_nonfinite=3" in text
    assert not (tmp_path / "out" / "final").exists()


def _cli_args(recipe: Path, overrides: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args([str(recipe), *overrides])


def test_gradient_checkpointing_and_bf16_runs(tmp_path):
    plain = run_toy(tmp_path / "a", "train.max_steps=2", "toy.num_eval=0")
    ckpt = run_toy(tmp_path / "b", "train.max_steps=2", "toy.num_eval=0", "train.gradient_checkpointing=true")
    assert plain.status == ckpt.status == "completed"
    a, b = step_losses(tmp_path / "a" / "out"), step_losses(tmp_path / "b" / "out")
    assert a[2] == pytest.approx(b[2], abs=1e-5)  # recomputation replays the same dropout masks
    bf16 = run_toy(tmp_path / "c", "train.max_steps=2", "toy.num_eval=0", "train.precision=bf16")
    c = step_losses(tmp_path / "c" / "out")
    assert bf16.status == "completed" and c[1] == pytest.approx(a[1], abs=0.05) and c[1] != a[1]


def test_deepspeed_config_auto_values_are_filled(tmp_path):
    from llava_smoe.training.deepspeed_backend import fill_deepspeed_config

    run = load_recipe(write_recipe(tmp_path), ["train.backend=deepspeed",
                                               "train.deepspeed_config=train/deepspeed/zero3.json",
                                               "train.precision=bf16", "train.grad_clip=0.5"])
    root = Path(__file__).resolve().parents[1]
    config = fill_deepspeed_config(root / "train/deepspeed/zero3.json", run.train, world_size=2)
    assert config["train_batch_size"] == 4 * 2 * 2 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and config["zero_optimization"]["stage"] == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 conflicts"):
        fill_deepspeed_config(bad, run.train, world_size=1)


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
    import os
    import signal

    real_step = trainer_mod.moe_optimizer_step

    def preempt_at_3(model, step):
        real_step(model, step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_mod, "moe_optimizer_step", preempt_at_3)
    before = signal.getsignal(signal.SIGTERM)
    result = run_toy(tmp_path, "train.max_steps=10", "toy.num_eval=0")
    assert signal.getsignal(signal.SIGTERM) is before
    # The flag is shared through the next step's all-reduce, so the stop lands one step later.
    assert result.status == "interrupted" and result.step == 4
    assert result.checkpoint.name == "step-00000004" and read_state(result.checkpoint).step == 4


def test_cli_prints_resolved_config(tmp_path, capsys):
    from llava_smoe.cli import main

    assert main(["train", str(write_recipe(tmp_path)), "train.seed=5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 5 and printed["task"] == "toy" and printed["toy"]["hidden_size"] == 32
    # every nested section typed, with its defaults: the task's MoE config and its router's options
    assert printed["toy"]["moe"]["router_options"] == {"balance_coef": 0.01, "z_loss_coef": 0.001, "balance_count": "all"}
    assert printed["train"]["grad_accum"] == 2 and printed["optim"]["schedule"] == "cosine"
    assert main(["train", str(write_recipe(tmp_path)), "train.sed=5", "--print-config"]) == 2
    assert "train.sed" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["train.max_steps=0"], "error: train.max_steps: must be >= 1, got 0"),
    (["toy.moe.router=smo"], "error: toy.moe.router: 'smo' is not one of ['competesmoe', "),
    (["optim.groups.0.lr=fast"], "error: optim.groups.0.lr: expected a number, got 'fast'"),
])
def test_cli_reports_a_bad_recipe_in_one_line(tmp_path, capsys, args, message):
    from llava_smoe.cli import main

    assert main(["train", str(write_recipe(tmp_path)), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: recipe not found:")


def _first_step_gradients(tmp_path: Path, monkeypatch, micro_batch_size: int, grad_accum: int) -> dict:
    """Every parameter's gradient of optimizer step 1 on sequences of 4-12 tokens (no dropout,
    no aux losses), and the supervised-token counts of its micro-batches."""
    data = json.loads(json.dumps(RECIPE))
    data["toy"].update(dropout=0.0, min_seq_len=4, num_eval=0,
                       moe={"num_experts": 4, "top_k": 2, "router": "smoe",
                            "router_options": {"balance_coef": 0.0, "z_loss_coef": 0.0}})
    data["train"].update(max_steps=1, micro_batch_size=micro_batch_size, grad_accum=grad_accum, grad_clip=0.0)
    grads, counts = {}, []
    real_step, real_count = TorchBackend.step, trainer_mod.Trainer._loss_items

    def record(backend):
        grads.update({n: p.grad.clone() for n, p in backend.module.named_parameters() if p.grad is not None})
        return real_step(backend)

    def count(trainer, micro):
        counts.extend(trainer.parts.count_loss_items(b) for b in micro)
        return real_count(trainer, micro)

    with monkeypatch.context() as patch:  # undone before the next call wraps the real methods again
        patch.setattr(TorchBackend, "step", record)
        patch.setattr(trainer_mod.Trainer, "_loss_items", count)
        trainer_mod.train(load_recipe(write_recipe(tmp_path, data)))
    return {"grads": grads, "counts": counts}


def test_loss_is_the_mean_over_the_steps_tokens_whatever_the_micro_batching(tmp_path, monkeypatch):
    """Micro-batch 1 x accumulation 4 computes the gradient of micro-batch 4 x accumulation 1
    on sequences of different lengths: every token of the step weighs the same."""
    whole = _first_step_gradients(tmp_path / "whole", monkeypatch, 4, 1)
    split = _first_step_gradients(tmp_path / "split", monkeypatch, 1, 4)
    assert sum(split["counts"]) == whole["counts"][0]
    assert len(set(split["counts"])) > 1  # unequal micro-batches: a mean of means would weigh them wrongly
    assert whole["grads"].keys() == split["grads"].keys() and whole["grads"]
    for name, grad in whole["grads"].items():
        torch.testing.assert_close(split["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
