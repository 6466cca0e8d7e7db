"""The `clip` task: contrastive pretraining of a tiny tower, then a VLM stage that loads it frozen."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from llava_smoe.config import ConfigError
from llava_smoe.data import ShapesWorldConfig, generate_shapes_world
from llava_smoe.data.records import BadSampleError
from llava_smoe.model import build_vision_tower
from llava_smoe.training import load_recipe
from llava_smoe.training.tasks import get_task
from llava_smoe.training.trainer import train

CLIP_MODEL = {
    "projection_dim": 16,
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 16},
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "max_position_embeddings": 40},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_world(ShapesWorldConfig(seed=0, num_train=64, num_val=8, num_test=8, num_heldout=4), out)
    return out


def clip_recipe(path, world, out, steps, **task):
    recipe = {
        "task": "clip",
        "clip": {"data": str(world / "pretrain.json"), "image_folder": str(world / "images"),
                 "tokenizer": str(world / "tokenizer"), "max_length": 40, "model": CLIP_MODEL, **task},
        "train": {"output_dir": str(out), "max_steps": steps, "micro_batch_size": 16, "precision": "fp32",
                  "log_every": 1, "tensorboard": False, "progress_bar": False},
        "optim": {"groups": [{"name": "all", "patterns": ["*"], "lr": 1e-3}], "warmup_ratio": 0.1},
    }
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_contrastive_stage_learns_and_exports_a_tower_a_vlm_stage_loads_frozen(world, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "vision"
    result = train(clip_recipe(tmp_path / "clip.yaml", world, out, steps=30))
    assert result.status == "completed"
    seen = losses(out)
    # In-batch retrieval among 16 captions: chance is log(16); the loss must fall well below both.
    assert sum(seen[-5:]) / 5 < min(0.7 * sum(seen[:5]) / 5, 0.8 * math.log(16)), seen
    final = out / "final"
    assert json.loads((final / "preprocessor_config.json").read_text())["image_mean"][0] == pytest.approx(0.4815, abs=1e-4)

    tower = build_vision_tower({"backend": "hf", "name_or_path": str(final), "feature_layer": -2})
    trained = load_file(final / "model.safetensors")
    for name, value in tower.model.state_dict().items():
        assert torch.equal(value, trained[f"vision_model.{name}"]), name  # the vision half, as trained
    assert tower(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32)
    # The text half's keys are expected leftovers; a missing vision weight is an error.
    broken = tmp_path / "broken"
    shutil.copytree(final, broken)
    save_file({k: v for k, v in trained.items() if k != "vision_model.post_layernorm.weight"},
              broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks.*post_layernorm"):
        build_vision_tower({"backend": "hf", "name_or_path": str(broken), "feature_layer": -2})

    # A projector stage on top: the tower stays frozen, and a recipe that tries to train it is refused.
    vlm = {"data": str(world / "pretrain.json"), "image_folder": str(world / "images"),
           "tokenizer": str(world / "tokenizer"), "template": "plain", "max_length": 64,
           "model": {"vision": {"backend": "hf", "name_or_path": str(final), "feature_layer": -2, "freeze": True},
                     "projector": {"type": "mlp2x_gelu"},
                     "language_model": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                                   "num_key_value_heads": 1, "max_position_embeddings": 128}}}}
    groups = [{"name": "projector", "patterns": ["projector.*"], "lr": 1e-3},
              {"name": "lm", "patterns": ["language_model.*"], "lr": 1e-3}]
    recipe = {"task": "vlm", "vlm": vlm, "optim": {"groups": groups},
              "train": {"output_dir": str(tmp_path / "pretrain"), "max_steps": 3, "micro_batch_size": 8,
                        "precision": "fp32", "tensorboard": False, "progress_bar": False}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(recipe))
    assert train(load_recipe(tmp_path / "pretrain.yaml")).status == "completed"
    after = load_file(tmp_path / "pretrain" / "final" / "model.safetensors")
    for name, value in tower.model.state_dict().items():
        assert torch.equal(after[f"vision_tower.model.{name}"], value), name
    recipe["optim"]["groups"] = [{"name": "vision", "patterns": ["vision_tower.*"], "lr": 1e-3}, *groups]
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match="frozen by the model config"):
        train(load_recipe(tmp_path / "pretrain.yaml"))
    # ... unless the stage unfreezes it, which the exported config then records.
    recipe["vlm"]["vision_freeze"] = False
    recipe["train"]["output_dir"] = str(tmp_path / "unfrozen")
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(recipe))
    assert train(load_recipe(tmp_path / "pretrain.yaml")).status == "completed"
    tuned = load_file(tmp_path / "unfrozen" / "final" / "model.safetensors")
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(tuned[f"vision_tower.model.{key}"], tower.model.state_dict()[key])
    config = json.loads((tmp_path / "unfrozen" / "final" / "config.json").read_text())
    assert config["vision_config"]["freeze"] is False


def test_bad_caption_records_are_named_or_skipped_and_counted(world, tmp_path):
    records = json.loads((world / "pretrain.json").read_text())[:20]
    records[3] = {"id": "text-only", "conversations": records[3]["conversations"][1:]}  # no image
    records[3]["conversations"].insert(0, {"from": "human", "value": "Describe a shape."})
    records[5]["conversations"][1]["value"] = "a long caption " * 20
    (tmp_path / "bad.json").write_text(json.dumps(records))
    run = clip_recipe(tmp_path / "clip.yaml", world, tmp_path / "out", steps=1, data=str(tmp_path / "bad.json"))
    with pytest.raises(BadSampleError, match="text-only.*needs an image|needs an image.*text-only"):
        train(run)

    run = clip_recipe(tmp_path / "clip.yaml", world, tmp_path / "out", steps=1, data=str(tmp_path / "bad.json"),
                      on_bad_sample="skip")
    dataset = get_task("clip").build(run).train_dataset
    assert len(dataset) == 19 and dataset.skip_stats.as_dict() == {"no_image": 1}
    stats = dataset.validate()
    assert stats.as_dict() == {"no_image": 1, "too_long": 1}


def test_clip_config_errors(world, tmp_path):
    def build(**task):
        return get_task("clip").build(clip_recipe(tmp_path / "c.yaml", world, tmp_path / "o", steps=1, **task))

    with pytest.raises(ConfigError, match="text_config and vision_config"):
        build(model={"projection_dim": 8})
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build(max_length=77)
    with pytest.raises(ConfigError, match="clip.tokenizer"):
        build(tokenizer=str(tmp_path / "missing"))


def test_answers_objective_learns_every_turn_and_exports_the_tower(world, tmp_path):
    torch.set_num_threads(1)
    records = json.loads((world / "instruct_val.json").read_text())
    records[0]["conversations"][1]["value"] = "purple"  # no training answer says this
    (tmp_path / "val.json").write_text(json.dumps(records))
    out = tmp_path / "answers"
    run = clip_recipe(tmp_path / "answers.yaml", world, out, steps=40, objective="answers",
                      data=str(world / "instruct_train.json"), eval_data=str(tmp_path / "val.json"),
                      augment={"shift": 4, "hflip": True}, on_bad_sample="skip")
    parts = get_task("clip").build(run)
    train_records = json.loads((world / "instruct_train.json").read_text())
    batch = parts.collate_fn([parts.train_dataset[i] for i in range(3)])
    turns = [len(r["conversations"]) // 2 for r in train_records[:3]]
    assert batch["image_index"].tolist() == [b for b, n in enumerate(turns) for _ in range(n)]  # every turn pair
    answers = sorted({t["value"] for r in train_records for t in r["conversations"][1::2]})
    first = train_records[0]["conversations"][1]["value"]
    assert batch["answer_ids"][0].item() == answers.index(first)

    result = train(run)
    assert result.status == "completed"
    seen = losses(out)
    assert sum(seen[-5:]) / 5 < 0.6 * math.log(len(answers)), seen  # chance is log(#answers)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss" in line]
    assert evals[-1]["eval/skipped/unknown_answer"] == 1  # the eval record outside the answers, counted
    final = out / "final"
    trained = load_file(final / "model.safetensors")
    assert not any("head" in k for k in trained)  # the answer head is not part of the tower
    tower = build_vision_tower({"backend": "hf", "name_or_path": str(final), "feature_layer": -2})
    for name, value in tower.model.state_dict().items():
        assert torch.equal(value, trained[f"vision_model.{name}"]), name


def test_augment_shifts_and_mirrors_only_in_training(world, tmp_path):
    from llava_smoe.data.augment import AugmentConfig, augment

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).view(2, 3, 8, 8)
    assert torch.equal(augment(x, AugmentConfig()), x)
    torch.manual_seed(0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    crops = [padded[..., dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]  # crops[12]: no shift
    shifted = [augment(x, AugmentConfig(shift=2)) for _ in range(20)]
    drawn = [next(k for k, c in enumerate(crops) if torch.equal(y, c)) for y in shifted]  # each a crop, or StopIteration
    assert len(set(drawn)) > 5
    flipped = augment(x, AugmentConfig(hflip=True))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, x))
    torch.manual_seed(0)
    many = augment(x.repeat(32, 1, 1, 1), AugmentConfig(hflip=True))
    mirrored = sum(torch.equal(f, i.flip(-1)) for f, i in zip(many, x.repeat(32, 1, 1, 1)))
    assert 8 < mirrored < 56  # about half

    # The contrastive objective augments in training mode only: eval sees the images as they are.
    def loss(mode: str, **task):
        torch.manual_seed(0)  # the same weights for every build
        parts = get_task("clip").build(clip_recipe(tmp_path / "c.yaml", world, tmp_path / "o", steps=1, **task))
        batch = parts.collate_fn([parts.train_dataset[i] for i in range(8)])
        batch.pop("skipped")
        torch.manual_seed(1)
        model = parts.model.train(mode == "train")
        with torch.no_grad():
            return model(**batch).loss.item()

    assert loss("train") == pytest.approx(loss("eval"), abs=1e-6)  # no augmentation: the same
    assert loss("train", augment={"hflip": True}) != pytest.approx(loss("eval", augment={"hflip": True}), abs=1e-6)
