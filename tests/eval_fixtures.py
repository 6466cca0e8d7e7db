"""A tiny saved checkpoint (random weights, CompeteSMoE in the LM) and shapes-world data for
the evaluation tests; imported by tests/test_eval*.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest


@dataclass
class TinySetup:
    checkpoint: str
    data_dir: str  # shapes world: instruct_test.json, images/

    @property
    def test_json(self) -> str:
        return os.path.join(self.data_dir, "instruct_test.json")


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> TinySetup:
    import torch
    from transformers import AutoTokenizer

    from llava_smoe import save_pretrained
    from llava_smoe.data import ShapesWorldConfig, generate_shapes_world
    from llava_smoe.model import build_model
    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
    )
    from llava_smoe.testing import tiny_model_config

    root = tmp_path_factory.mktemp("eval_tiny")
    data_dir = str(root / "shapes")
    generate_shapes_world(ShapesWorldConfig(seed=0, num_train=30, num_val=0, num_test=6, num_heldout=0,
                                            vocab_size=400), data_dir)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(data_dir, "tokenizer"))
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template="chatml", num_image_tokens=16, image=ImageProcessingConfig(image_size=32)))
    torch.manual_seed(0)
    model = build_model(tiny_model_config(
        "clip", "qwen2", vocab_size=len(tokenizer), image_token_id=processor.image_token_id,
        moe={"num_experts": 4, "top_k": 2, "router": "competesmoe"},
    ))
    checkpoint = str(root / "ckpt")
    save_pretrained(model, processor, checkpoint)
    return TinySetup(checkpoint, data_dir)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_setup):
    """(model, processor) loaded back from the checkpoint folder, as evaluation does."""
    from llava_smoe import load_pretrained

    return load_pretrained(tiny_setup.checkpoint)
