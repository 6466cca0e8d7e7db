"""The quickstart's plumbing: every tiny recipe of train/tiny, chained, on a small shapes world.

Steps are cut to a few per stage (accuracy is measured by the real run, see docs/quickstart.md);
this checks that the stages hand their outputs on and that the summary describes the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_smoe.quickstart import STAGES, run_quickstart

RECIPES = Path(__file__).resolve().parents[1] / "train" / "tiny"


@pytest.mark.slow
def test_quickstart_chains_every_tiny_stage(tmp_path):
    torch.set_num_threads(1)
    summary = run_quickstart(tmp_path / "out", tmp_path / "data", RECIPES, router="smoe", progress=False,
                             num_train=48, num_test=100, overrides=["train.max_steps=2", "train.micro_batch_size=8"])
    out = tmp_path / "out"
    for stage in STAGES:
        assert (out / stage / "final").is_dir(), stage
    # Stage 1 loads stage 0b's tower (frozen) and stage 0's LM; stage 2 upcycles with the router asked for.
    pretrain = json.loads((out / "pretrain" / "final" / "config.json").read_text())
    assert pretrain["vision_config"]["freeze"] is True and pretrain["vision_config"]["feature_layer"] == -2
    final = json.loads((out / "finetune_moe" / "final" / "config.json").read_text())
    assert final["text_config"]["llava_smoe_moe"]["moe_config"]["router"] == "smoe"
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved) >= {"accuracy", "blind_accuracy", "router", "seconds", "checkpoint", "accuracy_by_type"}
    assert 0.0 <= saved["accuracy"] <= 1.0 and saved["num_questions"] > 100
    assert "exists" not in saved["accuracy_by_type"]  # presence questions are off by default
    assert set(saved["stage_seconds"]) == {"data", *STAGES, "eval"}
    # Only standard weights trained (the tower's position embedding, no projector vectors): the
    # checkpoint exports to transformers' LLaVA (a projector with position vectors would be refused).
    assert final["vision_config"]["freeze_except"] == ["*position_embedding*"]
    from llava_smoe.convert import export_hf_llava
    from llava_smoe.pretrained import load_pretrained

    model, processor = load_pretrained(out / "finetune_moe" / "final")
    export_hf_llava(model, processor, tmp_path / "hf")
    # The questions put the image after the text, and the checkpoint's processor says so, so the
    # front ends prompt as stage 2 trained; stage 1's captions keep it first.
    test = json.loads((tmp_path / "data" / "instruct_test.json").read_text())
    assert all(r["conversations"][0]["value"].endswith("\n<image>") for r in test)
    assert processor.config.image_position == "last"
    assert load_pretrained(out / "pretrain" / "final")[1].config.image_position == "first"

    # A second run reuses the data made with the same generator settings.
    made = (tmp_path / "data" / "manifest.json").stat().st_mtime_ns
    run_quickstart(tmp_path / "out2", tmp_path / "data", RECIPES, router="smoe", progress=False,
                   num_train=48, num_test=100, overrides=["train.max_steps=1", "train.micro_batch_size=8"])
    assert (tmp_path / "data" / "manifest.json").stat().st_mtime_ns == made


@pytest.mark.slow
def test_quickstart_runs_every_stage_on_your_own_data(tmp_path):
    """A LLaVA dataset without captions or tokenizer: the LM stage trains a BPE on its text that
    every later stage uses, each image's questions stand in for its caption, and (`--tower
    answers`) the tower learns to answer the training questions."""
    from llava_smoe.data.worlds import WorldConfig, generate_world
    from llava_smoe.quickstart import PipelineData

    torch.set_num_threads(1)
    data = tmp_path / "mine"
    generate_world(WorldConfig(world="single", seed=0, num_train=48, num_val=8, num_test=24), data)
    own = PipelineData(train=data / "instruct_train.json", test=data / "instruct_test.json", images=data / "images",
                       val=data / "instruct_val.json", image_size=64, tower_objective="answers",
                       augment="shift+flip")
    out = tmp_path / "out"
    summary = run_quickstart(out, tmp_path / "unused", RECIPES, router="smoe", progress=False, own_data=own,
                             overrides=["train.max_steps=2", "train.micro_batch_size=8"])
    assert not (tmp_path / "unused").exists()  # no shapes world was generated
    captions = {c["image"]: c["conversations"][1]["value"] for c in json.loads((out / "data" / "captions.json").read_text())}
    first = json.loads((data / "instruct_train.json").read_text())[0]
    question, answer = first["conversations"][0]["value"].removeprefix("<image>\n"), first["conversations"][1]["value"]
    assert len(captions) == 48 and captions[first["image"]] == f"{question} {answer}"
    assert (out / "lm" / "final" / "tokenizer.json").is_file()
    import yaml

    tower = yaml.safe_load((out / "vision" / "run_config.yaml").read_text())["clip"]
    assert tower["objective"] == "answers" and tower["data"] == str(data / "instruct_train.json")
    assert tower["augment"] == {"shift": 8, "hflip": True}  # 1/8 of the 64 px side
    for stage in ("pretrain", "finetune_moe"):  # every image stage
        assert yaml.safe_load((out / stage / "run_config.yaml").read_text())["vlm"]["augment"] == tower["augment"]
    # The world's questions put the image first, and stage 2's processor is told so.
    assert yaml.safe_load((out / "finetune_moe" / "run_config.yaml").read_text())["vlm"]["image_position"] == "first"
    final = out / "finetune_moe" / "final"
    trained, used = (json.loads((f / "tokenizer.json").read_text())["model"] for f in (out / "lm" / "final", final))
    assert trained["vocab"] == used["vocab"] and trained["merges"] == used["merges"]  # the LM stage's BPE
    vision = json.loads((final / "config.json").read_text())["vision_config"]["hf_config"]
    assert vision["image_size"] == 64 and vision["patch_size"] == 16
    assert set(summary["accuracy_by_type"]) <= {"color", "shape", "yes_color", "yes_shape"}
    assert summary["num_questions"] == 24 and summary["test"] == str(data / "instruct_test.json")


def test_own_data_keeps_the_image_where_its_training_questions_put_it(capsys):
    """Stage 2's processor is told the records' own placement (the more common of first and
    last), so the front ends place an image as training did; the line says what was counted."""
    from llava_smoe.quickstart import _image_position

    def record(question, image="a.png"):
        return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}

    last = [record("What colour?\n<image>")] * 3 + [record("<image>\nWhat shape?")] * 2
    assert _image_position(last + [record("Left <image> or right?"), record("No placeholder.")]) == "last"
    assert "first in 2, last in 3, inside the text in 1, nowhere in 1: " in capsys.readouterr().out
    assert _image_position(last[:1] + last[-1:]) == "first"  # a tie keeps the default
    assert _image_position([record("What colour?\n<image>", image=None)] + last[-1:]) == "first"  # text-only: not counted
    assert _image_position([]) == "first"


def test_own_data_errors_are_one_line(tmp_path, capsys):
    from llava_smoe.cli import main

    assert main(["quickstart", "--train", str(tmp_path / "t.json"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "error: your own data needs --train, --test and --image-folder together"
    (tmp_path / "images").mkdir()
    assert main(["quickstart", "--train", str(tmp_path / "t.json"), "--test", str(tmp_path / "t.json"),
                 "--image-folder", str(tmp_path / "images"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --train {tmp_path / 't.json'} does not exist"
    assert main(["quickstart", "--augment", "shift", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --augment: applies to your own data (--train)")


@pytest.mark.slow
def test_a_stage_that_stops_early_ends_the_quickstart_in_one_line(tmp_path, capsys):
    from llava_smoe.cli import main

    # A learning rate that overflows: the first stage skips five non-finite steps and stops.
    rc = main(["quickstart", "--recipes", str(RECIPES), "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"),
               "--num-train", "48", "--no-progress", "--set", "train.max_steps=20", "--set", "train.micro_batch_size=8",
               "--set", 'optim.groups=[{name: all, patterns: ["*"], lr: 1.0e+38}]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: stage lm did not complete: stopped at step 6: 5 non-finite steps"), err[-1]
    assert not (tmp_path / "o" / "lm" / "final").exists()
