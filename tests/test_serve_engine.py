"""The generation engine on a tiny random-weight checkpoint: streaming, batching, stops, limits."""

import io
import threading

import pytest
import torch
from PIL import Image

from llava_smoe.serve.config import EngineConfig, ServerLimits
from llava_smoe.inference import (
    ContextLengthError,
    Engine,
    RequestError,
    SamplingParams,
    TextStreamer,
    Turn,
)
from llava_smoe.testing import save_tiny_checkpoint

GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = Engine(EngineConfig(checkpoint, device="cpu", max_batch_size=4))
    yield engine
    engine.close()


def red():
    return Image.new("RGB", (40, 30), (220, 20, 20))


def blue():
    return Image.new("RGB", (24, 48), (20, 20, 220))


def hf_greedy(engine, messages, images, max_new_tokens):
    """The oracle: transformers' own generate on the same prompt."""
    proc = engine.processor
    ids = proc.build_generation_prompt(messages, has_image=len(images), insert_image_placeholder=False)
    pixel_values = proc.preprocess_images(images) if images else None
    out = engine.model.generate(input_ids=ids[None], pixel_values=pixel_values, attention_mask=torch.ones_like(ids)[None],
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=proc.stop_token_ids,
                                pad_token_id=proc.pad_token_id)
    generated = out[0, len(ids):].tolist()
    return [t for t in generated if t not in proc.stop_token_ids]


def test_stream_equals_generate_and_transformers(engine):
    turns = [Turn("user", "What shape is in the image?", [red()])]
    deltas = list(engine.stream(turns, GREEDY))
    completion = engine.generate(turns, GREEDY)
    assert "".join(deltas) == completion.text
    assert len(deltas) > 1  # really streamed
    assert completion.text == engine.processor.decode(completion.token_ids)
    assert completion.prompt_tokens == engine.count_prompt_tokens(turns)
    expected = hf_greedy(engine, [{"role": "user", "content": "<image>\nWhat shape is in the image?"}], [red()], 24)
    assert completion.token_ids == expected
    assert completion.finish_reason == ("length" if len(expected) == 24 else "stop")


def test_concurrent_requests_are_batched_and_match_sequential(engine):
    prompts = [[Turn("user", "Describe the picture." * k, [red()] if k % 2 else [])] for k in range(1, 6)]
    # Different lengths: rows leave the batch (and its KV cache) at different steps.
    params = [SamplingParams(max_new_tokens=4 + 5 * k, temperature=0.0) for k in range(len(prompts))]
    sequential = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
    results = [None] * len(prompts)

    def worker(i):
        results[i] = engine.generate(prompts[i], params[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.token_ids for r in results] == [s.token_ids for s in sequential]
    assert max(r.peak_batch_size for r in results) > 1  # some requests really shared a batch


def test_stop_strings_end_the_reply_before_the_match(engine):
    turns = [Turn("user", "How many squares are there?")]
    full = engine.generate(turns, SamplingParams(max_new_tokens=40, temperature=0.0)).text
    stop = full[6:9]
    assert len(stop) == 3
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop=[stop, "never-generated"])
    deltas = list(engine.stream(turns, params))
    completion = engine.generate(turns, params)
    assert completion.text == "".join(deltas) == full[: full.find(stop)]
    assert completion.finish_reason == "stop"
    assert all(stop not in d for d in deltas)


def test_streamer_keeps_multibyte_characters_whole(engine):
    tok = engine.processor.tokenizer
    text = "Grüße 日本語 € 🙂 ok"  # mostly unseen in training: split into single-byte tokens
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really span several tokens
    streamer = TextStreamer(tok)
    deltas = [streamer.push(i)[0] for i in ids]
    deltas.append(streamer.flush()[0])
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_streamer_holds_back_partial_stop_string(engine):
    tok = engine.processor.tokenizer
    streamer = TextStreamer(tok, stop=["STOP"])
    out, stopped = [], False
    for i in tok.encode("abc STO then STOP rest", add_special_tokens=False):
        delta, stopped = streamer.push(i)
        out.append(delta)
        if stopped:
            break
    assert stopped and "".join(out) == "abc STO then "


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(engine):
    turns = [Turn("user", "Describe the picture.", [blue()])]
    a = engine.generate(turns, SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))
    b = engine.generate(turns, SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))
    c = engine.generate(turns, SamplingParams(max_new_tokens=16, temperature=1.0, seed=8))
    assert a.token_ids == b.token_ids != c.token_ids
    greedy = engine.generate(turns, SamplingParams(max_new_tokens=16, temperature=0.0))
    nucleus = engine.generate(turns, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=1))
    assert nucleus.token_ids == greedy.token_ids


def test_context_length_is_refused_not_truncated(engine):
    turns = [Turn("user", "hi")]
    prompt = engine.count_prompt_tokens(turns)
    with pytest.raises(ContextLengthError, match=rf"{prompt} prompt tokens \+ {engine.max_context} new tokens"):
        engine.submit(turns, SamplingParams(max_new_tokens=engine.max_context))
    long_turns = [Turn("user", "square " * engine.max_context)]
    with pytest.raises(ContextLengthError, match="over the context length of 512"):
        engine.submit(long_turns)
    # Exactly filling the context is allowed.
    ok = engine.generate(turns, SamplingParams(max_new_tokens=engine.max_context - prompt, temperature=0.0))
    assert ok.prompt_tokens + ok.completion_tokens <= engine.max_context


def test_multi_turn_with_images_in_two_turns(engine):
    turns = [
        Turn("user", "What is this?", [red()]),
        Turn("assistant", "A red circle."),
        Turn("user", "And this one?", [blue()]),
    ]
    completion = engine.generate(turns, GREEDY)
    messages = [
        {"role": "user", "content": "<image>\nWhat is this?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "<image>\nAnd this one?"},
    ]
    assert completion.token_ids == hf_greedy(engine, messages, [red(), blue()], 24)
    # Every image token went to top_k experts in every MoE layer, and only image tokens are counted as such.
    n = engine.processor.num_image_tokens
    assert completion.routing and len(completion.routing) == 2
    for layer in completion.routing:
        assert sum(layer["image"]) == 2 * n * 2
        assert sum(layer["text"]) >= (completion.prompt_tokens - 2 * n) * 2


def test_cancel_stops_generation(engine):
    handle = engine.submit([Turn("user", "Describe the picture.")], SamplingParams(max_new_tokens=400, temperature=0.0))
    handle.cancel()
    completion = handle.result()
    assert completion.finish_reason == "cancelled"
    assert completion.completion_tokens < 400


@pytest.mark.parametrize("turns, match", [
    ([Turn("user", "look <image> here")], "reserved image token"),
    ([Turn("user", "hi"), Turn("assistant", "hello", [Image.new("RGB", (8, 8))])], "only user messages"),
    ([Turn("user", "hi"), Turn("assistant", "hello")], "must end with a user turn"),
    ([Turn("assistant", "hello")], "'user' was expected"),
])
def test_bad_conversations_are_refused(engine, turns, match):
    with pytest.raises(RequestError, match=match):
        engine.submit(turns)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


def test_configs_validate(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="not a folder"):
        EngineConfig(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(checkpoint, dtype="int8")
    with pytest.raises(ValueError, match="device"):
        EngineConfig(checkpoint, device="tpu")
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        ServerLimits(max_concurrent_requests=0)
    with pytest.raises(ValueError, match="not a folder"):
        ServerLimits(file_url_roots=[str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=512"):
        Engine(EngineConfig(checkpoint, device="cpu", max_context=4096))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_request_flow(checkpoint):
    engine = Engine(EngineConfig(checkpoint, device="cuda"))  # auto dtype: bfloat16 on CUDA
    try:
        assert engine.dtype == torch.bfloat16 and engine.model.device.type == "cuda"
        turns = [Turn("user", "What is this?", [red()])]
        params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
        assert engine.generate(turns, params).token_ids == engine.generate(turns, params).token_ids
        assert "".join(engine.stream(turns, params)) == engine.generate(turns, params).text
    finally:
        engine.close()


def test_bf16_on_cpu(checkpoint):
    engine = Engine(EngineConfig(checkpoint, device="cpu", dtype="bfloat16"))
    try:
        assert engine.model.dtype == torch.bfloat16
        completion = engine.generate([Turn("user", "What is this?", [red()])], GREEDY)
        assert completion.finish_reason in ("stop", "length") and completion.prompt_tokens > 16
    finally:
        engine.close()


def test_chat_loop_through_its_prompt(engine, tmp_path):
    from llava_smoe.serve.chat import chat_loop
    from llava_smoe.serve.conversation import Conversation

    red().save(tmp_path / "red.png")
    lines = iter([f"/image {tmp_path / 'red.png'}", "What is this?", "/routing", "/image /no/such.png",
                  "And now?", "/reset", "/quit", "never read"])
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return next(lines)

    out = io.StringIO()
    conversation = Conversation()
    assert chat_loop(engine, conversation, GREEDY, read, out) == 0
    text = out.getvalue()
    assert prompts == ["you> "] * 7
    assert "attached to your next message" in text
    assert text.count("assistant> ") == 2
    assert "language_model.model.layers.1.mlp" in text  # /routing table
    assert "cannot open image '/no/such.png'" in text
    assert "(conversation cleared)" in text and conversation.turns == []
