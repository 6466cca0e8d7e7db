"""One checkpoint, one loader: `load_pretrained` pairs a model with its own processor, checks
them once, converts older checkpoints, and the Auto classes work after `import llava_smoe`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_smoe import load_pretrained, save_pretrained
from llava_smoe.model import LlavaSmoeConfig, build_model, lm_moe
from llava_smoe.testing import tiny_model_config, tiny_processor

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"
T = 16


def _batch(image_token_id: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 300, (2, 24), generator=g)
    ids[:, 2:2 + T] = image_token_id
    return ids, torch.randn(2, 3, 32, 32, generator=g)


def _v1_architecture(processor):
    """The model the format-1 fixture describes, built by today's code."""
    torch.manual_seed(0)
    return build_model(tiny_model_config(
        vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id,
        moe={"num_experts": 4, "top_k": 2, "router": "competesmoe"}, projector={"type": "moe"},
        moe_placement={"language_model": "every_other", "vision_tower": [1]})).eval()


def test_format_1_checkpoint_loads_converted(tmp_path):
    # Format 1 checkpoints predate tokenizers trained with the templates' role words (394 tokens).
    processor = tiny_processor("chatml", image_mode="center_crop", with_template_text=False)
    model = _v1_architecture(processor)
    # The tensors format 1 wrote are exactly those of today's model.
    written = set(FIXTURE.joinpath("weights.txt").read_text().splitlines())
    assert {f"{k} {list(v.shape)}" for k, v in model.state_dict().items()} == written

    legacy = tmp_path / "legacy"
    model.save_pretrained(tmp_path / "weights")
    legacy.mkdir()
    shutil.copy(tmp_path / "weights" / "model.safetensors", legacy)
    for name in ("config.json", "processor_config.json"):
        shutil.copy(FIXTURE / name, legacy)
    processor.tokenizer.save_pretrained(legacy)
    assert "moe_placement" in json.loads((legacy / "config.json").read_text())

    loaded, proc = load_pretrained(legacy)
    ids, px = _batch(processor.image_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=px).logits,
                                   model(input_ids=ids, pixel_values=px).logits, rtol=0, atol=0)
    assert proc.config.template == "chatml" and proc.image_config.mode == "center_crop"
    # Converted: each component records its own MoE layers, and re-saving writes format 2.
    assert loaded.config.format_version == 2
    assert lm_moe(loaded.config.text_config).layers == [1, 3]
    assert loaded.config.vision_config["moe"]["layers"] == [1]
    assert loaded.config.projector_config["moe_config"]["router"] == "competesmoe"
    save_pretrained(loaded, proc, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["format_version"] == 2
    assert not {"moe_config", "moe_placement", "chat_template_name", "image_size", "image_pad_mode"} & set(saved)
    assert "image_mean" not in saved["vision_config"]
    again, _ = load_pretrained(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, pixel_values=px).logits,
                                   model(input_ids=ids, pixel_values=px).logits, rtol=0, atol=0)


def test_a_processor_that_does_not_fit_the_model_is_refused(tmp_path):
    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
    )

    processor = tiny_processor()
    model = build_model(tiny_model_config(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id))
    wrong = LlavaSmoeProcessor(processor.tokenizer, ProcessorConfig(
        template="chatml", num_image_tokens=9, image=ImageProcessingConfig(image_size=48)))
    with pytest.raises(ValueError, match=r"processor and model disagree: tokens per image 9 \(processor\) vs 16 "
                                         r"\(vision tower\); image size 48 \(processor\) vs 32"):
        save_pretrained(model, wrong, tmp_path / "bad")
    save_pretrained(model, processor, tmp_path / "good")
    wrong.save_pretrained(tmp_path / "good")  # someone else's processor written over it
    with pytest.raises(ValueError, match="processor and model disagree"):
        load_pretrained(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "missing")


def test_import_llava_smoe_registers_the_auto_classes_without_importing_torch(tmp_path):
    processor = tiny_processor()
    model = build_model(tiny_model_config(vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id))
    save_pretrained(model, processor, tmp_path)
    script = f"""
import sys
import llava_smoe
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import llava_smoe stays light"
from transformers import AutoConfig, AutoModelForImageTextToText
model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r})
print(type(AutoConfig.from_pretrained({str(tmp_path)!r})).__name__, type(model).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["LlavaSmoeConfig", "LlavaSmoeForConditionalGeneration"]
    # transformers first, llava_smoe second: registered at once.
    late = subprocess.run([sys.executable, "-c", "import transformers.models.auto; import llava_smoe; "
                           "from transformers import AutoConfig; print(AutoConfig.for_model('llava_smoe').model_type)"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert late.returncode == 0 and late.stdout.strip() == "llava_smoe", late.stderr[-3000:]
    assert isinstance(LlavaSmoeConfig.from_pretrained(tmp_path), LlavaSmoeConfig)


def test_the_cli_imports_no_torch_for_help():
    code = "import sys; from llava_smoe.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
