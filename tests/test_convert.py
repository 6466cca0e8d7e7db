"""Export to and import from the standard transformers LLaVA format, checked against plain
transformers: equal logits and greedy replies (fp32), equal prompts and pixels (non-square images
included), the MoE families' routing, clear refusals, and round trips."""

from __future__ import annotations

import json

import pytest
import torch
from hf_llava_fixtures import run_plain_transformers, save_llava15_like
from PIL import Image

from llava_smoe import load_pretrained
from llava_smoe.convert import ConversionError, export_hf_llava, import_hf_llava
from llava_smoe.inference import Engine, EngineConfig, SamplingParams, Turn, encode_turns
from llava_smoe.model import build_model
from llava_smoe.testing import save_tiny_checkpoint, tiny_model_config, tiny_processor, tiny_text_config

RED_WIDE = Image.new("RGB", (40, 24), (220, 20, 20))
BLUE_TALL = Image.new("RGB", (18, 45), (20, 20, 220))


def tiny(processor, vision="clip", family="qwen2", moe=None, placement="every_other", **overrides):
    """A random-weight model for `processor`, built as a recipe builds one."""
    torch.manual_seed(0)
    vocab = len(processor.tokenizer)
    config = tiny_model_config(vision, family, vocab_size=vocab, image_token_id=processor.image_token_id, **overrides)
    tok = processor.tokenizer
    config["language_model"] = {"config": tiny_text_config(family, vocab, bos_token_id=tok.bos_token_id,
                                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)}
    if moe is not None:
        config["moe"] = {"num_experts": 4, "top_k": 2, **moe}
        config["moe_placement"] = {"language_model": placement}
    return build_model(config).eval()


def ours_vs_transformers(model, processor, folder):
    """Our logits on our prompts, and transformers' on the exported folder's, for an image
    prompt, a two-image conversation and a text-only one."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(folder, backend="pil")
    for turns in ([Turn("user", "What shape is in the image?", [RED_WIDE])],
                  [Turn("user", "What is this?", [RED_WIDE]), Turn("assistant", "A red shape."),
                   Turn("user", "And this one?", [BLUE_TALL])],
                  [Turn("user", "How many squares are there?")]):
        prompt = encode_turns(processor, turns)
        conversation = [{"role": t.role, "content": [{"type": "image"}] * len(t.images) + [{"type": "text", "text": t.text}]}
                        for t in turns]
        text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = hf_processor(text=text, images=[im for t in turns for im in t.images] or None, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt.token_ids.tolist()
        with torch.no_grad():
            ours = model(input_ids=prompt.token_ids[None], pixel_values=prompt.pixel_values).logits[0]
            theirs = hf(**inputs).logits[0]
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


@pytest.fixture(scope="module")
def chatml():
    return tiny_processor("chatml")


def test_export_loads_in_plain_transformers_with_equal_logits_and_replies(tmp_path):
    """The tiny serving checkpoint (Qwen2 LM, MoE every other layer) in a process that cannot import llava_smoe."""
    checkpoint = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    model, processor = load_pretrained(checkpoint)
    folder = export_hf_llava(model, processor, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen2_moe" and config["text_config"]["mlp_only_layers"] == [0, 2]
    assert config["text_config"]["norm_topk_prob"] is True and config["image_token_index"] == processor.image_token_id
    RED_WIDE.save(tmp_path / "red.png")
    BLUE_TALL.save(tmp_path / "blue.png")
    turns_cases = [
        [Turn("user", "What shape is in the image?", [RED_WIDE])],
        [Turn("user", "What is this?", [RED_WIDE]), Turn("assistant", "A red shape."),
         Turn("user", "And this one?", [BLUE_TALL])],
        [Turn("user", "How many squares are there?")],
    ]
    paths = {id(RED_WIDE): str(tmp_path / "red.png"), id(BLUE_TALL): str(tmp_path / "blue.png")}
    cases = [{"conversation": [{"role": t.role, "content": [{"type": "image"}] * len(t.images)
                                + [{"type": "text", "text": t.text}]} for t in turns],
              "images": [paths[id(im)] for t in turns for im in t.images], "max_new_tokens": 12} for turns in turns_cases]
    results = run_plain_transformers(folder, cases, tmp_path)
    with Engine(EngineConfig(), model=model, processor=processor) as engine:
        for turns, result in zip(turns_cases, results):
            prompt = encode_turns(processor, turns)
            assert result["input_ids"].tolist() == prompt.token_ids.tolist()
            if prompt.pixel_values is not None:
                assert torch.allclose(result["pixel_values"], prompt.pixel_values, atol=1e-6)
            with torch.no_grad():
                ours = model(input_ids=prompt.token_ids[None], pixel_values=prompt.pixel_values).logits[0]
            assert torch.allclose(ours, result["logits"], atol=1e-5), (ours - result["logits"]).abs().max()
            reply = engine.generate(turns, SamplingParams(max_new_tokens=12, temperature=0.0))
            generated = [t for t in result["generated"].tolist() if t not in processor.stop_token_ids]
            assert reply.token_ids == generated[:len(reply.token_ids)] and len(generated) >= len(reply.token_ids)


@pytest.mark.parametrize("family, moe, placement, expected", [
    ("qwen2", None, None, "qwen2"),
    ("llama", None, None, "llama"),
    ("qwen3", {"router": "smoe"}, "every_other", "qwen3_moe"),
    ("llama", {"router": "competesmoe"}, "all", "mixtral"),
    ("llama", {"router": "smoe", "top_k": 1}, "every_other", "qwen2_moe"),
    ("qwen2", {"router": "competesmoe"}, [0, 3], "qwen2_moe"),
])
def test_each_family_exports_with_equal_logits(tmp_path, chatml, family, moe, placement, expected):
    model = tiny(chatml, family=family, moe=moe, placement=placement)
    with torch.no_grad():  # distinct experts and routers, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(std=0.5)
    folder = export_hf_llava(model, chatml, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["text_config"]["model_type"] == expected
    ours_vs_transformers(model, chatml, folder)


def test_mixture_of_tokens_exports_after_conversion(tmp_path, chatml):
    from llava_smoe.moe import convert_mot_to_token_choice

    model = tiny(chatml, moe={"router": "mot"})
    with pytest.raises(ConversionError, match="convert_mot_to_token_choice"):
        export_hf_llava(model, chatml, tmp_path / "hf")
    convert_mot_to_token_choice(model)
    ours_vs_transformers(model, chatml, export_hf_llava(model, chatml, tmp_path / "hf"))


@pytest.mark.parametrize("vision", ["open_clip", "siglip"])
def test_vision_towers_export(tmp_path, chatml, vision):
    model = tiny(chatml, vision=vision)
    folder = export_hf_llava(model, chatml, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["model_type"] == ("siglip_vision_model" if vision == "siglip" else "clip_vision_model")
    assert config["vision_feature_select_strategy"] == ("full" if vision == "siglip" else "default")
    ours_vs_transformers(model, chatml, folder)


def test_images_after_the_text_export_and_import_as_placed(tmp_path, chatml):
    from dataclasses import replace

    from llava_smoe.processing import LlavaSmoeProcessor

    last = LlavaSmoeProcessor(chatml.tokenizer, replace(chatml.config, image_position="last"))
    prompt = encode_turns(last, [Turn("user", "What shape is in the image?", [RED_WIDE])]).token_ids.tolist()
    image_at = [i for i, t in enumerate(prompt) if t == last.image_token_id]
    assert len(prompt) - image_at[-1] < 8  # the image ends the user turn, the answer a few tokens on
    model = tiny(last)
    folder = export_hf_llava(model, last, tmp_path / "hf")
    ours_vs_transformers(model, last, folder)  # transformers' chat template places them the same
    _, imported = import_hf_llava(folder)
    assert imported.config.image_position == "last"


def test_linear_projector_exports_as_identity_second_layer(tmp_path, chatml):
    model = tiny(chatml, projector={"type": "linear"})
    folder = export_hf_llava(model, chatml, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["projector_hidden_act"] == "linear"
    ours_vs_transformers(model, chatml, folder)
    imported, _ = import_hf_llava(folder)
    assert imported.config.projector_config["type"] == "linear"


@pytest.mark.parametrize("overrides, match", [
    ({"projector": {"type": "mlp2x_gelu", "position_embedding": True}}, "position"),
    ({"projector": {"type": "mlp3x_gelu"}}, "'mlp3x_gelu' has no counterpart"),
    ({"moe": {"router": "remoe"}}, "ReLU gates"),
    ({"moe": {"router": "sigmoid"}}, "per-expert bias"),
    ({"moe": {"router": "xmoe"}}, "cosine"),
    ({"moe": {"router": "smoe", "num_shared_experts": 1}}, "gates its shared expert by a sigmoid"),
    ({"family": "phi3", "moe": {"router": "smoe"}}, "no transformers MoE family has the phi3"),
    ({"moe": {"router": "smoe"}, "moe_placement_vision": [0]}, "vision tower has MoE layers"),
])
def test_what_the_format_cannot_hold_is_refused(tmp_path, chatml, overrides, match):
    overrides = dict(overrides)
    family, vision_moe = overrides.pop("family", "qwen2"), overrides.pop("moe_placement_vision", None)
    moe = overrides.pop("moe", None)
    if vision_moe is not None:
        torch.manual_seed(0)
        config = tiny_model_config(vocab_size=len(chatml.tokenizer), image_token_id=chatml.image_token_id,
                                   moe={"num_experts": 4, "top_k": 2, **moe},
                                   moe_placement={"language_model": "none", "vision_tower": vision_moe})
        model = build_model(config)
    else:
        model = tiny(chatml, family=family, moe=moe, **overrides)
    with pytest.raises(ConversionError, match=match):
        export_hf_llava(model, chatml, tmp_path / "hf")


@pytest.mark.parametrize("mode", ["pad", "resize", "center_crop"])
def test_exported_image_processor_gives_our_pixels(tmp_path, mode):
    """PIL backend: equal pixels; transformers' default torchvision backend resizes with its own
    bicubic kernel, a level or two of 255 off in places."""
    from transformers import AutoProcessor

    processor = tiny_processor("chatml", image_mode=mode)
    folder = export_hf_llava(tiny(processor), processor, tmp_path / "hf")
    images = [Image.effect_noise((size, 31), 80).convert("RGB") for size in (17, 31, 53, 90)]
    ours = processor.preprocess_images(images)
    pil = AutoProcessor.from_pretrained(folder, backend="pil").image_processor(images, return_tensors="pt")
    assert torch.allclose(pil["pixel_values"], ours, atol=1e-6)
    torchvision = AutoProcessor.from_pretrained(folder).image_processor(images, return_tensors="pt")["pixel_values"]
    level = 1 / 255 / min(processor.image_config.std)
    assert (torchvision - ours).abs().max() <= 2 * level + 1e-5


def test_templates_that_tokenise_differently_as_a_whole_are_refused_unless_allowed(tmp_path):
    # A BPE that never saw vicuna's " USER: " / " ASSISTANT:" merges them with their neighbours.
    processor = tiny_processor("vicuna_v1", with_template_text=False)
    model = tiny(processor)
    with pytest.raises(ConversionError, match="tokenises it as a whole"):
        export_hf_llava(model, processor, tmp_path / "hf")
    folder = export_hf_llava(model, processor, tmp_path / "hf", allow_tokenization_drift=True)
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(folder, backend="pil")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    expected = processor.decode(processor.build_generation_prompt([{"role": "user", "content": "What is it?"}],
                                                                  has_image=[1]), skip_special_tokens=False)
    rendered = hf.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered.replace("<image>", "") == expected.replace("<image>", "")  # the same text, image token expanded


# -- import -----------------------------------------------------------------------------------------
def test_import_tiny_transformers_llava_gives_equal_logits(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = save_llava15_like(tmp_path / "hf", image_size=56)
    model, processor = import_hf_llava(folder)
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    hf_processor = AutoProcessor.from_pretrained(folder, backend="pil")
    for image in (RED_WIDE, BLUE_TALL):
        pixels = processor.preprocess_images([image])
        assert torch.allclose(pixels, hf_processor.image_processor([image], return_tensors="pt")["pixel_values"],
                              atol=1e-6)
        ids = processor.build_generation_prompt([{"role": "user", "content": "What is it?"}], has_image=[1])
        with torch.no_grad():
            ours = model(input_ids=ids[None], pixel_values=pixels).logits
            theirs = hf(input_ids=ids[None], pixel_values=pixels).logits
        assert torch.allclose(ours, theirs, atol=1e-5)
    text_ids = processor.build_generation_prompt([{"role": "user", "content": "hi"}])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=text_ids[None]).logits, hf(input_ids=text_ids[None]).logits, atol=1e-5)


def test_import_follows_the_published_llava15_settings(tmp_path):
    folder = save_llava15_like(tmp_path / "hf")
    out = tmp_path / "ours"
    from llava_smoe.cli import main

    assert main(["import", str(folder), "--out", str(out)]) == 0
    model, processor = load_pretrained(out)
    c = processor.config
    assert (c.template, c.image_token, c.num_image_tokens) == ("vicuna_v1", "<image>", 576)
    assert (c.image.image_size, c.image.mode, c.image.resample) == (336, "center_crop", "bicubic")
    assert c.image.mean == (0.48145466, 0.4578275, 0.40821073)
    assert model.config.image_token_id == 32000 and processor.pad_token_id == 32001
    assert model.vision_tower.config.feature_layer == -2 and model.vision_tower.config.feature_select == "patch"
    assert model.config.projector_config["type"] == "mlp2x_gelu"
    segments = processor.render_segments([{"role": "user", "content": "<image>\nHi?"}], add_generation_prompt=True)
    assert "".join(s.text for s in segments) == (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nHi? ASSISTANT:")


def test_import_then_export_round_trips(tmp_path):
    from safetensors.torch import load_file

    folder = save_llava15_like(tmp_path / "hf", image_size=56)
    model, processor = import_hf_llava(folder)
    again = export_hf_llava(model, processor, tmp_path / "again", allow_tokenization_drift=True)
    first, second = (json.loads((f / "config.json").read_text()) for f in (folder, again))
    for key in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy", "projector_hidden_act",
                "image_seq_length", "multimodal_projector_bias"):
        assert first[key] == second[key], key
    for part in ("vision_config", "text_config"):
        for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
            assert first[part][key] == second[part][key], (part, key)
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Ours -> export -> import: the same checkpoint, the MoE record (router and options) included.
    checkpoint = save_tiny_checkpoint(str(tmp_path / "tiny"), router="competesmoe")
    tiny_model, tiny_proc = load_pretrained(checkpoint)
    back, back_proc = import_hf_llava(export_hf_llava(tiny_model, tiny_proc, tmp_path / "tiny_hf"))
    assert back_proc.config == tiny_proc.config
    assert back.config.text_config.llava_smoe_moe == tiny_model.config.text_config.llava_smoe_moe
    theirs = back.state_dict()
    buffers = {"router.step", "router.total_steps"}  # schedule positions, reset to 0 by the export
    for k, v in tiny_model.state_dict().items():
        if not any(k.endswith(b) for b in buffers):
            assert torch.equal(v, theirs[k]), k


def test_import_refuses_what_it_cannot_map(tmp_path):
    folder = save_llava15_like(tmp_path / "hf", image_size=56)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vision_feature_layer": [-2, -1]}))
    with pytest.raises(ConversionError, match="concatenates several layers"):
        import_hf_llava(folder)
    (folder / "config.json").write_text(json.dumps({**config, "projector_hidden_act": "relu"}))
    with pytest.raises(ConversionError, match="activation 'relu'"):
        import_hf_llava(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_hf_llava(tmp_path)


def test_cli_export_and_its_one_line_refusal(tmp_path, chatml, capsys):
    from llava_smoe import save_pretrained
    from llava_smoe.cli import main

    save_pretrained(tiny(chatml), chatml, tmp_path / "ok")
    assert main(["export", str(tmp_path / "ok"), "--format", "hf-llava", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and "wrote" in capsys.readouterr().out
    save_pretrained(tiny(chatml, projector={"type": "mlp2x_gelu", "position_embedding": True}), chatml,
                    tmp_path / "positioned")
    assert main(["export", str(tmp_path / "positioned"), "--format", "hf-llava", "--out", str(tmp_path / "x")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bar
    assert last.startswith("error: ") and "position_embedding" in last and "Traceback" not in last
