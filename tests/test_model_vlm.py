"""The VLM: splicing, parity with transformers' Llava, save/reload, generation, dtypes."""

from __future__ import annotations

import pytest
import torch

from llava_smoe.config import parse
from llava_smoe.model import (
    LlavaSmoeConfig,
    LlavaSmoeForConditionalGeneration,
    VLMConfig,
    build_model,
    resolve_attn_implementation,
)
from llava_smoe.testing import tiny_model_config, tiny_processor, tiny_text_config

load_model = LlavaSmoeForConditionalGeneration.from_pretrained  # a model folder without a processor

T = 16  # tiny towers: 32 px images, 8 px patches


def _model(vision="clip", family="qwen2", seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(vision, family, **kw)).eval()


def _batch(model, batch=2, seq=28, with_image=(True, True), seed=0):
    """input_ids with one image (T placeholders at position 3) in the rows flagged in with_image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.image_token_id, (batch, seq), generator=g)
    for row, has in enumerate(with_image):
        if has:
            ids[row, 3:3 + T] = model.config.image_token_id
    pixels = torch.randn(sum(with_image), 3, 32, 32, generator=g)
    return ids, pixels


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here, wrapped as a transformers fast tokenizer with <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a cat sits on the mat", "the dog runs in the park", "describe the image"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


# -- save / reload across towers and LM families --

@pytest.mark.parametrize("vision, family", [
    ("clip", "llama"), ("clip", "qwen2"), ("siglip", "qwen3"), ("open_clip", "phi3"), ("open_clip", "qwen2"),
])
def test_save_reload_identical_logits(tmp_path, vision, family):
    model = _model(vision, family)
    ids, px = _batch(model)
    ref = model(input_ids=ids, pixel_values=px).logits
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    reloaded = load_model(str(tmp_path))
    assert type(reloaded.language_model) is type(model.language_model)
    torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=px).logits, ref, rtol=0, atol=0)


def test_auto_classes_load_without_remote_code(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model = _model("siglip", "llama")
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LlavaSmoeConfig)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path, use_safetensors=True)
    ids, px = _batch(model)
    torch.testing.assert_close(auto(input_ids=ids, pixel_values=px).logits,
                               model(input_ids=ids, pixel_values=px).logits)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = _model("open_clip", "qwen2")
    model.save_pretrained(tmp_path)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called while loading a checkpoint")

    monkeypatch.setattr(torch, "load", no_pickle)
    reloaded = load_model(str(tmp_path))
    ids, px = _batch(model)
    torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=px).logits,
                               model(input_ids=ids, pixel_values=px).logits)


def test_pickled_weights_are_refused(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = _model()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_checkpoint_describes_itself(tmp_path):
    """The model config is the architecture; template, image token and preprocessing are the processor's."""
    import json

    from llava_smoe import load_pretrained, save_pretrained

    processor = tiny_processor("chatml", image_mode="pad")
    model = _model("open_clip", "qwen2", vocab_size=len(processor.tokenizer), image_token_id=processor.image_token_id)
    save_pretrained(model, processor, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"vision_config", "projector_config", "text_config", "image_token_id"} <= set(saved)
    assert not {"chat_template_name", "image_size", "image_mean", "num_image_tokens", "image_token"} & set(saved)
    cfg = LlavaSmoeConfig.from_pretrained(tmp_path)
    assert cfg.vision_config["open_clip_model_config"]["vision_cfg"]["layers"] == 3
    assert cfg.text_config.model_type == "qwen2"
    reloaded, proc = load_pretrained(tmp_path)
    assert proc.num_image_tokens == reloaded.num_image_tokens == T and proc.image_token == "<image>"
    assert proc.image_config.image_size == 32 and proc.image_config.mode == "pad"
    assert proc.config.template == "chatml"


# -- dense parity with transformers' LlavaForConditionalGeneration --

@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_dense_parity_with_transformers_llava(family):
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    ours = _model("clip", family)
    cfg = tiny_model_config("clip", family)
    text_cfg = dict(cfg["language_model"]["config"])
    text_config = ours.config.text_config.__class__(**{k: v for k, v in text_cfg.items() if k != "model_type"})
    vision_cfg = {k: v for k, v in cfg["vision"]["hf_config"].items() if k != "model_type"}
    ref = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_cfg), text_config=text_config,
        image_token_index=ours.config.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=T,
    )).eval()
    rename = {"vision_tower.model.": "model.vision_tower.", "projector.0.": "model.multi_modal_projector.linear_1.",
              "projector.2.": "model.multi_modal_projector.linear_2.", "language_model.model.": "model.language_model.",
              "language_model.lm_head.": "lm_head."}
    mapped = {}
    for name, value in ours.state_dict().items():
        prefix = next(p for p in rename if name.startswith(p))
        mapped[rename[prefix] + name[len(prefix):]] = value
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    ids, px = _batch(ours)
    torch.testing.assert_close(ours(input_ids=ids, pixel_values=px).logits,
                               ref(input_ids=ids, pixel_values=px).logits, rtol=1e-5, atol=1e-5)


# -- splicing --

def test_placeholder_feature_mismatch_raises_with_both_counts():
    model = _model()
    ids, px = _batch(model)
    ids[0, 3] = 5  # one placeholder fewer
    with pytest.raises(ValueError, match=rf"{2 * T - 1} image-token positions.*{2 * T} image features"):
        model(input_ids=ids, pixel_values=px)
    ids, _ = _batch(model)
    with pytest.raises(ValueError, match=rf"{2 * T} image-token positions.*0 image features"):
        model(input_ids=ids)


def test_mixed_image_and_text_only_batch():
    model = _model()
    ids, px = _batch(model, with_image=(True, False))
    both = model(input_ids=ids, pixel_values=px).logits
    torch.testing.assert_close(both[0], model(input_ids=ids[:1], pixel_values=px).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], model(input_ids=ids[1:]).logits[0], atol=1e-5, rtol=1e-5)


def test_image_positions_never_carry_loss():
    model = _model()
    ids, px = _batch(model)
    out = model(input_ids=ids, pixel_values=px, labels=ids.clone())
    masked = ids.masked_fill(ids == model.config.image_token_id, -100)
    ref = model(input_ids=ids, pixel_values=px, labels=masked)
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_gradients_reach_projector_not_frozen_tower():
    model = _model().train()
    ids, px = _batch(model)
    model(input_ids=ids, pixel_values=px, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())


# -- generation --

@pytest.mark.parametrize("vision, family", [("clip", "qwen2"), ("open_clip", "phi3")])
def test_greedy_generation_cached_equals_uncached(vision, family):
    model = _model(vision, family)
    ids, px = _batch(model, batch=1, with_image=(True,))
    common = {"input_ids": ids, "pixel_values": px, "attention_mask": torch.ones_like(ids), "max_new_tokens": 8,
              "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    cached = model.generate(**common, use_cache=True)
    uncached = model.generate(**common, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + 8)
    assert not (cached[0, ids.shape[1]:] == model.config.image_token_id).any()
    torch.testing.assert_close(cached, uncached)
    # the image matters: other pixels, other continuation logits
    logits_a = model(input_ids=ids, pixel_values=px).logits[0, -1]
    logits_b = model(input_ids=ids, pixel_values=px + 1).logits[0, -1]
    assert not torch.allclose(logits_a, logits_b)


def test_build_from_pretrained_parts_with_tokenizer(tmp_path, tokenizer):
    """A recipe-style dict: a locally saved LM and a tokenizer with <image>."""
    from transformers import AutoConfig, AutoModelForCausalLM

    lm_cfg = tiny_text_config("qwen2", vocab_size=len(tokenizer) - 1)  # the LM predates <image>
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm_cfg))
    lm.save_pretrained(tmp_path / "lm")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = parse(VLMConfig, {
        **tiny_model_config("clip", "qwen2"),
        "language_model": {"name_or_path": str(tmp_path / "lm")},
        "image_token_id": image_id, "vocab_size": len(tokenizer),
    })
    model = cfg.build().eval()
    assert model.config.text_config.vocab_size == len(tokenizer)
    torch.testing.assert_close(model.language_model.model.layers[0].mlp.up_proj.weight,
                               lm.model.layers[0].mlp.up_proj.weight)
    text = "<image>" * T + "\ndescribe the image"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert int((ids == image_id).sum()) == T
    out = model.generate(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=4,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert isinstance(tokenizer.decode(out[0, ids.shape[1]:]), str)
    model.save_pretrained(tmp_path / "vlm")
    assert load_model(str(tmp_path / "vlm")).config.text_config.vocab_size == len(tokenizer)


# -- dtypes and attention --

def test_bf16_forward_runs():
    model = _model("open_clip", "qwen2").to(torch.bfloat16)
    ids, px = _batch(model)
    out = model(input_ids=ids, pixel_values=px, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_bf16_build_and_load(tmp_path):
    model = build_model(tiny_model_config("clip", "llama", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}


def test_attention_implementation_choice():
    assert resolve_attn_implementation("sdpa") == "sdpa"
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(ValueError, match="one of"):
        resolve_attn_implementation("flash")
    model = _model()
    assert model.language_model.config._attn_implementation == "sdpa"


def test_config_errors():
    with pytest.raises(ValueError, match="outside the language model's vocabulary"):
        build_model(tiny_model_config(image_token_id=500))
    with pytest.raises(ValueError, match="unknown key 'mm_projector_type'"):
        parse(VLMConfig, {**tiny_model_config(), "mm_projector_type": "linear"})
    with pytest.raises(ValueError, match=r"unknown key 'language_model\.path'"):
        parse(VLMConfig, {**tiny_model_config(), "language_model": {"path": "x"}})
    with pytest.raises(ValueError, match="language_model.name_or_path: give exactly one"):
        parse(VLMConfig, {**tiny_model_config(), "language_model": {}})
    with pytest.raises(ValueError, match="image_token_id is not set"):
        LlavaSmoeForConditionalGeneration(LlavaSmoeConfig(
            vision_config=tiny_model_config()["vision"], text_config=tiny_text_config()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_attention_backends_agree():
    ref = build_model(tiny_model_config("clip", "qwen2", dtype="bfloat16", attn_implementation="sdpa")).cuda().eval()
    auto = build_model(tiny_model_config("clip", "qwen2", dtype="bfloat16", attn_implementation="auto")).cuda().eval()
    auto.load_state_dict(ref.state_dict())
    ids, px = _batch(ref)
    ids, px = ids.cuda(), px.cuda()
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids=ids, pixel_values=px).logits.float(),
                                   ref(input_ids=ids, pixel_values=px).logits.float(), atol=5e-2, rtol=5e-2)
