import json

import pytest
import torch

from llava_smoe.config import parse
from llava_smoe.processing import (
    IGNORE_INDEX,
    ConversationError,
    ImageProcessingConfig,
    LlavaSmoeProcessor,
    ProcessorConfig,
    train_bpe_tokenizer,
)

CORPUS = [
    "What color is the circle? red",
    "There is a blue square in the top left.",
    "How many shapes are there? three",
    "Is the green triangle on the left or the right? left",
] * 20

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "three shapes, all round"},
]

# What each template supervises per assistant turn: the text plus its end-of-turn marker.
SUPERVISED = {
    "vicuna_v1": lambda a: f" {a}</s>",
    "phi3": lambda a: f"{a}<|end|>",
    "chatml": lambda a: f"{a}<|im_end|>",
    "tokenizer": lambda a: f"{a}<|im_end|>",
    "plain": lambda a: f"{a}</s>",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


def make_processor(tokenizer, template, num_image_tokens=5):
    return LlavaSmoeProcessor(
        tokenizer, ProcessorConfig(template=template, num_image_tokens=num_image_tokens, image=ImageProcessingConfig(image_size=16))
    )


def supervised_runs(processor, input_ids, labels):
    """Decode each maximal run of supervised positions."""
    runs, current = [], []
    for i, lab in zip(input_ids.tolist(), labels.tolist()):
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert lab == i, "a supervised label must equal its input id"
            current.append(i)
    if current:
        runs.append(current)
    return [processor.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("template", ["vicuna_v1", "phi3", "chatml", "tokenizer"])
def test_multi_turn_masks_supervise_exactly_the_assistant_text(tokenizer, template):
    p = make_processor(tokenizer, template)
    out = p.encode_conversation(CONVERSATION, has_image=True)
    answers = [t["value"] for t in CONVERSATION if t["from"] == "gpt"]
    assert supervised_runs(p, out["input_ids"], out["labels"]) == [SUPERVISED[template](a) for a in answers]
    image_positions = out["input_ids"] == p.image_token_id
    assert int(image_positions.sum()) == p.num_image_tokens
    assert (out["labels"][image_positions] == IGNORE_INDEX).all()
    # The full prompt still reads as the conversation (nothing dropped between segments).
    text = p.decode(out["input_ids"], skip_special_tokens=False)
    assert "What color is the circle?" in text and "How many shapes are there?" in text


def test_plain_template_is_image_then_caption(tokenizer):
    p = make_processor(tokenizer, "plain", num_image_tokens=7)
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]
    out = p.encode_conversation(conv, has_image=True)
    ids = out["input_ids"].tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:8] == [p.image_token_id] * 7
    assert p.decode(ids[8:], skip_special_tokens=False) == "a red circle</s>"
    assert supervised_runs(p, out["input_ids"], out["labels"]) == ["a red circle</s>"]
    assert "Describe" not in p.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "phi3", "chatml", "tokenizer"])
def test_generation_prompt_is_the_training_prefix(tokenizer, template):
    p = make_processor(tokenizer, template)
    train = p.encode_conversation(CONVERSATION[:2], has_image=True)
    first_supervised = int((train["labels"] != IGNORE_INDEX).nonzero()[0])
    prompt = p.build_generation_prompt(CONVERSATION[:1], has_image=True)
    assert prompt.tolist() == train["input_ids"][:first_supervised].tolist()


def test_generation_prompt_inserts_missing_image_placeholder(tokenizer):
    p = make_processor(tokenizer, "chatml")
    with_placeholder = p.build_generation_prompt([{"role": "user", "content": "<image>\nHi"}], has_image=True)
    without = p.build_generation_prompt([{"role": "user", "content": "Hi"}], has_image=True)
    assert with_placeholder.tolist() == without.tolist()
    assert int((without == p.image_token_id).sum()) == p.num_image_tokens


def test_image_position_last_places_unplaced_images_after_each_turns_text(tokenizer):
    from dataclasses import replace

    first = make_processor(tokenizer, "chatml")
    last = LlavaSmoeProcessor(tokenizer, replace(first.config, image_position="last"))
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "And this?"}]
    placed = last.place_images(turns, has_image=[1, 0, 2])
    assert [m.content for m in placed] == ["Hi\n<image>", "red", "And this?\n<image>\n<image>"]
    assert last.place_images(turns[:1], has_image=True)[0].content == "Hi\n<image>"
    assert first.place_images(turns[:1], has_image=True)[0].content == "<image>\nHi"
    # Text that places its image itself is left alone by either.
    explicit = [{"role": "user", "content": "<image>\nHi"}]
    assert (last.build_generation_prompt(explicit, has_image=True).tolist()
            == first.build_generation_prompt(explicit, has_image=True).tolist())
    with pytest.raises(ValueError, match="image_position"):
        ProcessorConfig(image_position="middle")


def test_placement_of_reads_back_where_with_placeholders_put_the_images():
    from llava_smoe.processing.templates import IMAGE_POSITIONS, placement_of, with_placeholders

    for position in IMAGE_POSITIONS:
        for count in (1, 2):
            assert placement_of(with_placeholders("What colour?", "<image>", count, position), "<image>") == position
    assert placement_of("Left <image> or right?", "<image>") == "inside"
    assert placement_of("<image>\nWhich? <image>", "<image>") == "inside"
    assert placement_of("No image here.", "<image>") is None
    assert placement_of("<image>", "<image>") == "first"  # no words: either, and first is the default


def test_stop_tokens_include_end_of_turn(tokenizer):
    assert make_processor(tokenizer, "chatml").stop_token_ids[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert make_processor(tokenizer, "phi3").stop_token_ids[0] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert make_processor(tokenizer, "vicuna_v1").stop_token_ids == [tokenizer.eos_token_id]


def test_system_prompt_override(tokenizer):
    p = LlavaSmoeProcessor(tokenizer, ProcessorConfig(template="chatml", num_image_tokens=2, system_prompt="Be brief."))
    text = p.decode(p.encode_conversation(CONVERSATION[2:], has_image=False)["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize(
    "conversation, has_image, match",
    [
        (CONVERSATION, False, "1 '<image>' placeholder"),
        (CONVERSATION[2:], True, "0 '<image>' placeholder"),
        (CONVERSATION[:1], True, "no assistant turn"),
        ([CONVERSATION[1], CONVERSATION[0]], True, "'user' was expected"),
        ([{"from": "robot", "value": "x"}], False, "role 'robot'"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}], True, "assistant turn contains"),
    ],
)
def test_bad_conversations_raise(tokenizer, conversation, has_image, match):
    with pytest.raises(ConversationError, match=match):
        make_processor(tokenizer, "vicuna_v1").encode_conversation(conversation, has_image=has_image)


def test_tokenizer_template_that_is_not_prefix_stable_is_rejected(tokenizer):
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)
    # Renders only the last message: earlier turns vanish, so no exact mask exists.
    tok.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}A:{% endif %}"
    p = make_processor(tok, "tokenizer")
    with pytest.raises(ConversationError, match="not prefix-stable"):
        p.encode_conversation(CONVERSATION, has_image=True)


def test_tokenizer_template_needs_a_chat_template():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400, chat_template=None)
    with pytest.raises(ValueError, match="has none"):
        make_processor(tok, "tokenizer")


def test_image_token_is_added_as_one_special_token():
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)
    before = len(tok)
    p = LlavaSmoeProcessor(tok, ProcessorConfig(template="vicuna_v1", num_image_tokens=3, image_token="<img_patch>"))
    assert p.added_tokens == ["<img_patch>"] and len(tok) == before + 1
    assert tok.encode("a <img_patch> b", add_special_tokens=False).count(p.image_token_id) == 1


def test_processor_config_validation():
    with pytest.raises(ValueError, match="unknown template"):
        ProcessorConfig(template="llama9")
    with pytest.raises(ValueError, match="num_image_tokens"):
        ProcessorConfig(num_image_tokens=0)
    with pytest.raises(ValueError, match="no system prompt"):
        ProcessorConfig(template="plain", system_prompt="hi")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        parse(ProcessorConfig, {"template": "plain", "colour": 1})


@pytest.mark.parametrize("template", ["vicuna_v1", "tokenizer"])
def test_save_load_round_trip_gives_identical_encodings(tmp_path, tokenizer, template):
    p = make_processor(tokenizer, template)
    p.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["template"] == template and config["num_image_tokens"] == 5 and config["image"]["image_size"] == 16
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.bin"))
    q = LlavaSmoeProcessor.from_pretrained(tmp_path)
    assert q.added_tokens == []
    a, b = p.encode_conversation(CONVERSATION, True), q.encode_conversation(CONVERSATION, True)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(p.build_generation_prompt(CONVERSATION[:1], True), q.build_generation_prompt(CONVERSATION[:1], True))
    assert q.image_token_id == p.image_token_id and q.stop_token_ids == p.stop_token_ids


def test_from_pretrained_on_a_foreign_folder_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        LlavaSmoeProcessor.from_pretrained(tmp_path)


def test_trained_tokenizer_round_trips_through_auto_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<s>", "</s>")
    text = "What color is the <image> circle?</s>"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert loaded.convert_tokens_to_ids("<image>") == tokenizer.convert_tokens_to_ids("<image>")
    assert loaded.chat_template == tokenizer.chat_template


def test_tokenizer_vocab_too_small_is_explained():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_preprocess_images_batch_shape(tokenizer):
    from PIL import Image

    p = make_processor(tokenizer, "vicuna_v1")
    x = p.preprocess_images([Image.new("RGB", (30, 10)), Image.new("L", (8, 8))])
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert p.preprocess_images([]).shape == (0, 3, 16, 16)


def test_a_trained_tokenizer_writes_each_role_word_as_one_token():
    # The corpus never says "assistant": trained on it alone, a chatml turn header would cost 10 tokens.
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)
    for header in ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_start|>system\n"):
        assert len(tok.encode(header, add_special_tokens=False)) == 3, header
    for header in ("USER:", "ASSISTANT:"):
        assert len(tok.encode(header, add_special_tokens=False)) == 2, header
    # The corpus's own words are still whole.
    assert [tok.decode([i]) for i in tok.encode("What color is the circle?", add_special_tokens=False)] == [
        "What", " color", " is", " the", " circle", "?"]
