"""The `vlm` task end to end on a tiny shapes world: a fresh stage, then an MoE upcycling stage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava_smoe.config import ConfigError
from llava_smoe.data import ShapesWorldConfig, generate_shapes_world
from llava_smoe.training import load_recipe
from llava_smoe.training.trainer import train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_world(ShapesWorldConfig(seed=0, num_train=48, num_val=8, num_test=8, num_heldout=4), out)
    return out


def tiny_model(world):
    return {
        "vision": {"backend": "hf", "freeze": False, "feature_layer": -1,
                   "hf_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                                 "patch_size": 16}},
        "projector": {"type": "mlp2x_gelu"},
        "language_model": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "max_position_embeddings": 128}},
    }


def write_recipe(path, task: dict, out, steps, lr=3e-3):
    import yaml

    recipe = {
        "task": "vlm",
        "vlm": task,
        "train": {"output_dir": str(out), "max_steps": steps, "micro_batch_size": 8, "precision": "fp32",
                  "log_every": 1, "tensorboard": False, "progress_bar": False},
        "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": lr}], "warmup_ratio": 0.0},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def fresh_stage(world, tmp_path, data: str, steps: int):
    """A newly assembled tiny model trained `steps` steps on `data`: its run folder."""
    stage1 = tmp_path / "stage1"
    train(load_recipe(write_recipe(tmp_path / "s1.yaml", {
        "data": str(world / data), "image_folder": str(world / "images"),
        "tokenizer": str(world / "tokenizer"), "template": "chatml", "system_prompt": "", "max_length": 96,
        "model": tiny_model(world)}, stage1, steps=steps)))
    return stage1


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fresh_stage_then_moe_upcycling_stage(world, tmp_path):
    torch.set_num_threads(1)
    stage1 = tmp_path / "stage1"
    recipe = write_recipe(tmp_path / "s1.yaml", {
        "data": str(world / "instruct_train.json"), "image_folder": str(world / "images"),
        "tokenizer": str(world / "tokenizer"), "template": "chatml", "system_prompt": "", "max_length": 96,
        "model": tiny_model(world),
    }, stage1, steps=25)
    result = train(load_recipe(recipe))
    assert result.status == "completed"
    seen = losses(stage1)
    assert sum(seen[-5:]) / 5 < 0.8 * sum(seen[:5]) / 5, seen  # it learns

    stage2 = tmp_path / "stage2"
    recipe2 = write_recipe(tmp_path / "s2.yaml", {
        "data": str(world / "instruct_train.json"), "eval_data": str(world / "instruct_val.json"),
        "image_folder": str(world / "images"), "init_from": str(stage1 / "final"), "max_length": 96,
        "moe": {"router": "competesmoe", "num_experts": 4, "top_k": 2,
                "router_options": {"warmup_fraction": 0.0, "competition_prob": 0.5}},
        "moe_placement": {"language_model": "all"},
    }, stage2, steps=4)
    result = train(load_recipe(recipe2))
    assert result.status == "completed"
    rows = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in rows)
    assert any(r.get("aux/distill", 0) > 0 for r in rows)  # competition happened on some steps

    from llava_smoe import load_pretrained
    from llava_smoe.model import lm_moe
    from llava_smoe.moe import moe_layers

    model, processor = load_pretrained(stage2 / "final")
    assert len(moe_layers(model)) == 2
    assert lm_moe(model.config.text_config).moe_config.router == "competesmoe"
    assert processor.config.template == "chatml"
    assert int(moe_layers(model)[0][1].router.step) == 4  # the schedule position travels with the weights


def test_modality_length_grouping_pads_less_and_resumes_exactly(world, tmp_path, monkeypatch, crash_at_step):
    """train.group_by_modality_length: one modality per micro-batch, less padding than random
    batches, and an interrupted run resumes into the same batches and losses."""
    from llava_smoe.data import DataCollator

    torch.set_num_threads(1)
    stage1 = fresh_stage(world, tmp_path, "pretrain.json", steps=1)
    # Multi-turn Q&A (a few text-only), and captions: lengths and modalities to group.
    task = {"data": [str(world / "instruct_train.json"), str(world / "pretrain.json")],
            "image_folder": str(world / "images"), "init_from": str(stage1 / "final"), "max_length": 96}
    batches: list[tuple[set[bool], int, int]] = []  # (modalities, rows, padded length) per micro-batch
    real_call = DataCollator.__call__

    def recording(self, samples):
        batch = real_call(self, samples)
        batches.append(({s["image"] is not None for s in samples}, *batch["input_ids"].shape))
        return batch

    monkeypatch.setattr(DataCollator, "__call__", recording)

    def run(name, *overrides):
        batches.clear()
        recipe = write_recipe(tmp_path / f"{name}.yaml", task, tmp_path / name, steps=12)
        result = train(load_recipe(recipe, ["train.save_every=6", *overrides]))
        return result, list(batches)

    _, shuffled = run("shuffled")
    result, grouped = run("grouped", "train.group_by_modality_length=true")
    assert result.status == "completed" and len(grouped) == len(shuffled) == 12  # one epoch of 12 batches
    assert all(len(modalities) == 1 for modalities, _, _ in grouped)
    assert any(modalities == {True} for modalities, _, _ in grouped)
    padded = lambda seen: sum(rows * length for _, rows, length in seen)
    assert padded(grouped) < 0.9 * padded(shuffled), (padded(grouped), padded(shuffled))

    with crash_at_step(9), pytest.raises(KeyboardInterrupt):
        run("resumed", "train.group_by_modality_length=true")
    _, after = run("resumed", "train.group_by_modality_length=true", "train.resume=auto")
    assert after == grouped[6:]  # from the step-6 checkpoint, the same batches in the same order
    expected, got = losses(tmp_path / "grouped"), losses(tmp_path / "resumed")
    assert got == pytest.approx(expected, abs=1e-6)


def test_bad_stage_configuration_is_reported(world, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", {"data": str(world / "instruct_train.json")}, tmp_path / "o", 1)
    with pytest.raises(ConfigError, match="exactly one of `model`"):
        train(load_recipe(recipe))


def test_mixture_of_tokens_stage_then_transition_to_token_choice(world, tmp_path):
    torch.set_num_threads(1)
    common = {"data": str(world / "instruct_train.json"), "image_folder": str(world / "images"), "max_length": 192}
    stage1 = tmp_path / "dense"
    train(load_recipe(write_recipe(tmp_path / "s1.yaml", {
        **common, "tokenizer": str(world / "tokenizer"), "template": "chatml", "model": tiny_model(world)},
        stage1, steps=2)))
    mot = tmp_path / "mot"
    train(load_recipe(write_recipe(tmp_path / "s2.yaml", {
        **common, "init_from": str(stage1 / "final"),
        "moe": {"router": "mot", "num_experts": 4, "top_k": 1, "router_options": {"group_size": 4}},
        "moe_placement": {"language_model": "all"}}, mot, steps=2)))
    tuned = tmp_path / "transition"
    result = train(load_recipe(write_recipe(tmp_path / "s3.yaml", {
        **common, "init_from": str(mot / "final"), "mot_to_token_choice": "smoe"}, tuned, steps=2)))
    assert result.status == "completed"

    from llava_smoe import load_pretrained
    from llava_smoe.model import lm_moe
    from llava_smoe.moe import moe_layers

    model, _ = load_pretrained(tuned / "final")
    assert {type(layer.router).__name__ for _, layer in moe_layers(model)} == {"SMoERouter"}
    assert lm_moe(model.config.text_config).moe_config.router == "smoe"
    with torch.no_grad():  # a single sequence: impossible for groups of 4, fine for token choice
        out = model(input_ids=torch.tensor([[1, 5, 7, 9]]))
    assert torch.isfinite(out.logits).all()

    with pytest.raises(ConfigError, match="has no Mixture-of-Tokens layer"):
        train(load_recipe(write_recipe(tmp_path / "s4.yaml", {
            **common, "init_from": str(stage1 / "final"), "mot_to_token_choice": "smoe"}, tmp_path / "x", 1)))


def test_cli_reports_a_bad_record_in_one_line(world, tmp_path, capsys):
    """A missing image under the default policy ('error'): one line naming file, record and id."""
    from llava_smoe.cli import main

    records = json.loads((world / "instruct_train.json").read_text())[:4]
    records[2]["image"] = "no/such/image.png"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "data": str(data), "image_folder": str(world / "images"), "tokenizer": str(world / "tokenizer"),
        "template": "chatml", "model": tiny_model(world)}, tmp_path / "out", steps=1)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {data}: record #2 (id={records[2]['id']!r}): image file ")
    assert err[0].endswith("does not exist [missing_image]")


def skipping_recipe(world, tmp_path, max_length: int, micro_batch_size: int, steps: int, **vlm):
    import yaml

    recipe = write_recipe(tmp_path / "r.yaml", {
        "data": str(world / "instruct_train.json"), "image_folder": str(world / "images"),
        "tokenizer": str(world / "tokenizer"), "template": "chatml", "system_prompt": "", "max_length": max_length,
        "on_bad_sample": "skip", "model": tiny_model(world), **vlm}, tmp_path / "out", steps=steps)
    raw = yaml.safe_load(recipe.read_text())
    raw["train"]["micro_batch_size"] = micro_batch_size
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


def test_a_micro_batch_skipped_whole_is_counted_and_trains_nothing(world, tmp_path, capsys):
    """max_length 30 drops about three records in four (too_long), so micro-batches of 2 are often
    empty: such a step makes no update, is logged as one, and the run goes on."""
    torch.set_num_threads(1)
    result = train(load_recipe(skipping_recipe(world, tmp_path, max_length=30, micro_batch_size=2, steps=12)))
    assert result.status == "completed"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "lr" in r]  # the training records (one per step: log_every 1)
    empty = [r["step"] for r in rows if "loss" not in r]
    out = capsys.readouterr().out
    assert 0 < len(empty) < 12, empty
    assert rows[-1]["data/empty_steps"] == len(empty)
    assert [f"step {s}: every sample of its micro-batches was skipped; no update" in out for s in empty] == [True] * len(empty)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[-1]["data/skipped/too_long"] >= 2 * len(empty)


def test_cli_stops_in_one_line_when_every_sample_is_skipped(world, tmp_path, capsys):
    from llava_smoe.cli import main

    assert main(["train", str(skipping_recipe(world, tmp_path, max_length=10, micro_batch_size=8, steps=3))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("error: every sample of all 3 steps was skipped (too_long: 24): nothing was trained; check "
                    "the data, or raise the limit that drops them (max_length for too_long)")]
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing half-trained is saved
    # Longer than an epoch (48 records): stopped when the epoch ends, not after max_steps of nothing.
    assert main(["train", str(skipping_recipe(world, tmp_path, max_length=10, micro_batch_size=8, steps=100))]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: every sample of epoch 0 was skipped (too_long: 48): nothing to train on; check the data, "
        "or raise the limit that drops them (max_length for too_long)")


def test_evaluation_with_every_sample_skipped_is_an_error(world, tmp_path):
    """The eval set alone too long: an error, not an eval/loss of 0."""
    torch.set_num_threads(1)
    recipe = skipping_recipe(world, tmp_path, max_length=60, micro_batch_size=8, steps=1,
                             eval_data=str(world / "instruct_val.json"))
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    long_val = json.loads((world / "instruct_val.json").read_text())
    for r in long_val:  # every answer padded far past max_length
        r["conversations"][-1]["value"] += " red" * 80
    (tmp_path / "val.json").write_text(json.dumps(long_val))
    raw["vlm"]["eval_data"] = str(tmp_path / "val.json")
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"every evaluation sample was skipped \(too_long: \d+\)"):
        train(load_recipe(recipe))


def test_print_config_shows_every_nested_section_typed(world, tmp_path, capsys):
    import yaml

    from llava_smoe.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", {
        "data": str(world / "instruct_train.json"), "tokenizer": str(world / "tokenizer"), "model": tiny_model(world),
        "moe": {"router": "competesmoe"}}, tmp_path / "out", steps=1)
    assert main(["train", str(recipe), "vlm.model.vision.feature_layer=-2", "--print-config"]) == 0
    vlm = yaml.safe_load(capsys.readouterr().out)["vlm"]
    assert vlm["model"]["vision"]["feature_layer"] == -2 and vlm["model"]["vision"]["feature_select"] == "patch"
    assert vlm["model"]["projector"] == {"type": "mlp2x_gelu", "bias": True, "position_embedding": False,
                                         "moe_config": None}
    assert vlm["moe_placement"] == {"language_model": "every_other", "vision_tower": "none"}
    assert vlm["moe"]["router_options"]["competition_prob"] == 0.05 and vlm["image_mode"] == "pad"
    assert main(["train", str(recipe), "vlm.model.vision.feature_select=cls"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: vlm.model.vision.feature_select: 'cls' is not one of ['patch', 'cls_patch']")
    assert main(["train", str(recipe), "vlm.model.vision.feature_layer=9"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "error: vlm.model.vision.feature_layer: 9 is out of range for a tower with 1 blocks (valid: -2..1")


def test_an_moe_lm_of_the_lm_task_is_a_recipes_language_model(world, tmp_path):
    """`language_model: {name_or_path: <lm run>/final}`: the VLM takes the LM and its MoE layers as they are."""
    from llava_smoe import load_pretrained
    from llava_smoe.model import lm_moe
    from llava_smoe.moe import moe_layers

    torch.set_num_threads(1)
    lm_run = tmp_path / "lm"
    lm_recipe = tmp_path / "lm.yaml"
    import yaml

    lm_recipe.write_text(yaml.safe_dump({
        "task": "lm",
        "lm": {"data": [str(world / "text.txt")], "text_split": "line", "seq_len": 32, "bpe_vocab_size": 400,
               "cache_dir": str(tmp_path / "cache"),
               "model": {"architecture": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                          "num_hidden_layers": 2, "num_attention_heads": 2,
                                          "num_key_value_heads": 1, "max_position_embeddings": 128},
                         "moe": {"num_experts": 4, "top_k": 2, "router": "smoe"}, "moe_layers": [1]}},
        "train": {"output_dir": str(lm_run), "max_steps": 2, "micro_batch_size": 4, "precision": "fp32",
                  "tensorboard": False, "progress_bar": False},
        "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": 1e-3}]},
    }))
    assert train(load_recipe(lm_recipe)).status == "completed"

    model = tiny_model(world)
    model["language_model"] = {"name_or_path": str(lm_run / "final")}
    vlm = tmp_path / "vlm"
    recipe = write_recipe(tmp_path / "vlm.yaml", {
        "data": str(world / "instruct_train.json"), "image_folder": str(world / "images"),
        "tokenizer": str(lm_run / "final"), "template": "chatml", "max_length": 128, "model": model}, vlm, steps=2)
    assert train(load_recipe(recipe)).status == "completed"
    loaded, _ = load_pretrained(vlm / "final")
    assert [n for n, _ in moe_layers(loaded)] == ["language_model.model.layers.1.mlp"]
    assert lm_moe(loaded.config.text_config).layers == [1]


def test_widen_ffn_keeps_the_function_then_trains_and_reloads_wide(world, tmp_path):
    """vlm.widen_ffn: the checkpoint's LM FFNs at 2 x F compute what they did; the new units
    learn (their zero output columns move) and the saved checkpoint rebuilds at the new width."""
    from llava_smoe import load_pretrained
    from llava_smoe.model import surgery

    torch.set_num_threads(1)
    stage1 = fresh_stage(world, tmp_path, "instruct_train.json", steps=3)
    model, _ = load_pretrained(stage1 / "final")
    model.eval()
    ids = torch.randint(0, model.config.text_config.vocab_size - 1, (2, 7))
    with torch.no_grad():
        before = model.language_model(input_ids=ids).logits
        surgery.widen_lm_ffns(model, 2)
        after = model.language_model(input_ids=ids).logits
    assert model.config.text_config.intermediate_size == 128
    assert surgery.decoder_layers(model.language_model)[0].mlp.down_proj.weight.shape == (32, 128)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    wide = tmp_path / "wide"
    train(load_recipe(write_recipe(tmp_path / "w.yaml", {
        "data": str(world / "instruct_train.json"), "image_folder": str(world / "images"),
        "init_from": str(stage1 / "final"), "max_length": 96, "widen_ffn": 2}, wide, steps=2)))
    reloaded, _ = load_pretrained(wide / "final")
    mlp = surgery.decoder_layers(reloaded.language_model)[1].mlp
    assert reloaded.config.text_config.intermediate_size == 128
    assert mlp.down_proj.weight[:, 64:].abs().max() > 0  # the new units' outputs moved off zero


@pytest.mark.parametrize("task, reason", [
    ({"moe": {"router": "smoe", "num_experts": 4, "top_k": 2}}, "not both"),
    ({"widen_ffn": 1}, "at least 2"),
])
def test_widen_ffn_bad_settings_name_the_key(world, tmp_path, task, reason):
    recipe = write_recipe(tmp_path / "w.yaml", {
        "data": str(world / "instruct_train.json"), "init_from": str(tmp_path), "widen_ffn": 2, **task},
        tmp_path / "out", steps=1)
    with pytest.raises(ConfigError, match=reason) as err:
        load_recipe(recipe)
    assert "vlm.widen_ffn" in str(err.value)


def test_augment_changes_training_batches_only(world, tmp_path):
    """vlm.augment mirrors the training images; evaluation (and the exported model) sees them as
    they are."""
    from llava_smoe.training.tasks import get_task

    def loss(mode: str, **task):
        recipe = write_recipe(tmp_path / "a.yaml", {
            "data": str(world / "instruct_train.json"), "image_folder": str(world / "images"),
            "tokenizer": str(world / "tokenizer"), "template": "chatml", "max_length": 96,
            "model": tiny_model(world), **task}, tmp_path / "out", steps=1)
        torch.manual_seed(0)  # the same weights for every build
        parts = get_task("vlm").build(load_recipe(recipe))
        batch = parts.collate_fn([parts.train_dataset[i] for i in range(8)])
        batch.pop("skipped")
        torch.manual_seed(1)
        with torch.no_grad():
            return parts.model.train(mode == "train")(**batch).loss.item()

    torch.set_num_threads(1)
    assert loss("train") == pytest.approx(loss("eval"), abs=1e-6)
    assert loss("train", augment={"hflip": True}) != pytest.approx(loss("eval", augment={"hflip": True}), abs=1e-6)
    assert loss("eval", augment={"hflip": True}) == pytest.approx(loss("eval"), abs=1e-6)
    with pytest.raises(ConfigError, match="vlm.augment.shift"):
        loss("train", augment={"shift": -1})


def test_compiled_blocks_train_as_eager_does_and_save_the_same_weights(world, tmp_path):
    """train.compile: every transformer block compiled in place (the MoE layers eager) gives the
    eager run's losses and a checkpoint with the same names; evaluation runs eager."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    stage1 = fresh_stage(world, tmp_path, "instruct_train.json", steps=2)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / f"compile-{compiled}"
        recipe = write_recipe(tmp_path / f"c{compiled}.yaml", {
            "data": str(world / "instruct_train.json"), "eval_data": str(world / "instruct_val.json"),
            "image_folder": str(world / "images"), "init_from": str(stage1 / "final"), "max_length": 96,
            "moe": {"router": "smoe", "num_experts": 4, "top_k": 2}}, out, steps=4)
        assert train(load_recipe(recipe, [f"train.compile={str(compiled).lower()}"])).status == "completed"
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, graphs
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[compiled] = ([r["loss"] for r in rows if "loss" in r], [r["eval/loss"] for r in rows if "eval/loss" in r],
                          load_file(str(out / "final" / "model.safetensors")))
    (eager_loss, eager_eval, eager_w), (comp_loss, comp_eval, comp_w) = runs[False], runs[True]
    assert len(eager_loss) == 4 and len(eager_eval) == 1
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp_eval, eager_eval, rtol=1e-4, atol=1e-5)
    assert comp_w.keys() == eager_w.keys()
    for name, w in eager_w.items():
        torch.testing.assert_close(comp_w[name], w, rtol=1e-3, atol=1e-4, msg=name)


def test_compile_needs_the_torch_back_end(world, tmp_path):
    recipe = write_recipe(tmp_path / "c.yaml", {"data": str(world / "instruct_train.json"),
                                                "image_folder": str(world / "images"), "model": tiny_model(world)},
                          tmp_path / "out", steps=1)
    with pytest.raises(ConfigError, match=r"train\.compile: applies to train\.backend=torch"):
        load_recipe(recipe, ["train.compile=true", "train.backend=deepspeed",
                             "train.deepspeed_config=train/deepspeed/zero2.json"])


def test_eval_accuracy_is_logged_at_every_evaluation_and_matches_the_checkpoints(world, tmp_path):
    """vlm.eval_accuracy: exact-match accuracy on eval_data at each evaluation; the last one is
    what the saved checkpoint scores on the same questions."""
    from llava_smoe import load_pretrained
    from llava_smoe.evaluation.exact_match import evaluate_exact_match

    torch.set_num_threads(1)
    stage1 = fresh_stage(world, tmp_path, "instruct_train.json", steps=2)
    out = tmp_path / "acc"
    recipe = write_recipe(tmp_path / "a.yaml", {
        "data": str(world / "instruct_train.json"), "eval_data": str(world / "instruct_val.json"),
        "image_folder": str(world / "images"), "init_from": str(stage1 / "final"), "max_length": 96,
        "eval_accuracy": True, "moe": {"router": "competesmoe", "num_experts": 4, "top_k": 2}}, out, steps=4)
    assert train(load_recipe(recipe, ["train.eval_every=2"])).status == "completed"
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    records = json.loads((world / "instruct_val.json").read_text())
    types = {t for r in records for t in r["meta"]["types"]}
    for r in evals:
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and {k.split("/")[-1] for k in r if k.startswith("eval/accuracy/")} == types
    model, processor = load_pretrained(out / "final")
    final = evaluate_exact_match(model, processor, records, str(world / "images"))
    assert evals[-1]["eval/accuracy"] == final.accuracy
    assert {t: evals[-1][f"eval/accuracy/{t}"] for t in types} == final.per_type

    no_eval = write_recipe(tmp_path / "b.yaml", {"data": str(world / "instruct_train.json"), "eval_accuracy": True,
                                                 "image_folder": str(world / "images"), "model": tiny_model(world),
                                                 "tokenizer": str(world / "tokenizer")}, tmp_path / "b", steps=1)
    with pytest.raises(ConfigError, match=r"vlm\.eval_accuracy: scores eval_data's questions"):
        load_recipe(no_eval)
