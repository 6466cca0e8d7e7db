"""The MoE language model: construction, save/load, and reuse as the VLM's language model."""

from __future__ import annotations

import json

import pytest
import torch

from llava_smoe.model import (
    LMModelConfig,
    lm_moe,
    load_language_model,
    parameter_counts,
    save_language_model,
)
from llava_smoe.moe import MoELayer, moe_layers


def build_lm(config: LMModelConfig, **kwargs):
    return config.build(**kwargs)


def arch(family: str = "qwen3", **extra) -> dict:
    a = {"model_type": family, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, **extra}
    if family == "qwen3":
        a["head_dim"] = 8
    return a


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_moe_lm_saves_and_loads_with_identical_outputs(tmp_path, family):
    cfg = LMModelConfig(architecture=arch(family, tie_word_embeddings=True),
                        moe={"num_experts": 4, "top_k": 2, "router": "sigmoid", "num_shared_experts": 1},
                        moe_layers=[1])
    lm = build_lm(cfg, vocab_size=100, max_seq_len=32, eos_token_id=2)
    names = [name for name, _ in moe_layers(lm)]
    assert names == ["model.layers.1.mlp"] and not isinstance(lm.model.layers[0].mlp, MoELayer)
    assert lm.config.vocab_size == 100 and lm.config.max_position_embeddings == 32
    layer = lm.model.layers[1].mlp
    assert layer.shared_experts is not None
    assert layer.experts.w_gate_up_EDF2.std().item() == pytest.approx(0.02, rel=0.2)
    counts = parameter_counts(lm)
    per_expert = sum(p.numel() for p in layer.experts.parameters()) // 4
    assert counts["total"] - counts["active"] == 2 * per_expert

    out = save_language_model(lm, tmp_path / "lm")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == family and saved["llava_smoe_moe"]["layers"] == [1]
    loaded = load_language_model(str(out))
    spec = lm_moe(loaded.config)
    assert spec is not None and spec.moe_config.router == "sigmoid" and spec.moe_config.num_shared_experts == 1
    assert spec.layers == [1]
    x = torch.randint(0, 100, (2, 12))
    lm.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, lm(input_ids=x).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # the tie survives


def test_dense_lm_is_a_plain_transformers_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = build_lm(LMModelConfig(architecture=arch("llama")), vocab_size=64, max_seq_len=16).eval()
    assert lm_moe(lm.config) is None and not moe_layers(lm)
    reloaded = AutoModelForCausalLM.from_pretrained(save_language_model(lm, tmp_path / "dense")).eval()
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, lm(input_ids=x).logits)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="model_type"):
        LMModelConfig(architecture={"hidden_size": 8})
    with pytest.raises(ValueError, match="moe.top_k: top_k=5 exceeds num_experts=4"):
        LMModelConfig(moe={"num_experts": 4, "top_k": 5, "router": "smoe"})
    with pytest.raises(ValueError, match="max_position_embeddings=8 is below the sequence length 16"):
        build_lm(LMModelConfig(architecture=arch(max_position_embeddings=8)), vocab_size=50, max_seq_len=16)
    with pytest.raises(ValueError, match="out of range"):
        build_lm(LMModelConfig(architecture=arch(), moe={"num_experts": 2, "top_k": 1, "router": "smoe"},
                               moe_layers=[5]), vocab_size=50, max_seq_len=16)


def test_saved_lm_is_the_vlm_language_model_without_conversion(tmp_path):
    """Stage 2 from a pretrained MoE LM: the VLM loads the folder by path, MoE layers included, and
    reloads from its own checkpoint with the same outputs."""
    from llava_smoe.model import LlavaSmoeForConditionalGeneration, build_model
    from llava_smoe.model.surgery import upcycle_layers
    from llava_smoe.moe import MoEConfig
    from llava_smoe.testing import tiny_vision_config

    moe = {"num_experts": 4, "top_k": 2, "router": "competesmoe"}
    lm = build_lm(LMModelConfig(architecture=arch(), moe=moe, moe_layers="all"), vocab_size=96, max_seq_len=64)
    out = save_language_model(lm, tmp_path / "lm")
    vlm = build_model({
        "vision": tiny_vision_config("clip"),
        "projector": {"type": "mlp2x_gelu"},
        "language_model": {"name_or_path": str(out)},
        "image_token_id": 95,
    })
    assert [n for n, _ in moe_layers(vlm)] == ["language_model.model.layers.0.mlp", "language_model.model.layers.1.mlp"]
    x = torch.randint(0, 95, (1, 10))
    lm.eval()
    vlm.eval()
    with torch.no_grad():
        torch.testing.assert_close(vlm(input_ids=x).logits, lm(input_ids=x).logits, rtol=0, atol=0)
    vlm.save_pretrained(tmp_path / "vlm")
    again = LlavaSmoeForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, lm(input_ids=x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already an MoE layer"):  # surgery applies to dense FFNs only
        upcycle_layers(again.language_model.model.layers, [0], MoEConfig(), where="language model")
