"""The inference engine's scheduling on a tiny checkpoint, with transformers' `generate` as the
oracle: continuous batching (rows joining mid-batch and leaving), static batching, exact
per-request routing statistics, cancellation, and the refusal of Mixture-of-Tokens models.
Scheduling is measured in decoding steps, never in seconds."""

import threading

import pytest
import torch
from PIL import Image

from llava_smoe.inference import Engine, EngineConfig, SamplingParams, Turn, encode_turns
from llava_smoe.testing import save_tiny_checkpoint

# Mixed image and text-only requests of different lengths: rows join at different cache widths.
REQUESTS = [
    (Turn("user", "What shape is in the image?", [Image.new("RGB", (40, 30), (220, 20, 20))]), 30),
    (Turn("user", "hi"), 12),
    (Turn("user", "Describe the picture. " * 4, [Image.new("RGB", (24, 48), (20, 20, 220))]), 20),
    (Turn("user", "How many squares are there?"), 25),
    (Turn("user", "Is the circle bigger than the square? Describe it.", [Image.new("RGB", (32, 32), (0, 200, 0))]), 16),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="module")
def engine(checkpoint):
    with Engine(EngineConfig(checkpoint, device="cpu", max_batch_size=4)) as engine:
        yield engine


def greedy(n, **kwargs):
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kwargs)


def staggered(engine, requests, params):
    """Submit each request once the previous one has streamed its first text: every request
    after the first joins a batch that is already decoding."""
    handles = []
    for turn, p in zip(requests, params):
        handle = engine.submit([turn], p)
        handles.append(handle)
        next(iter(handle), None)
    return [h.result() for h in handles]


def hf_generate(engine, prompts, max_new_tokens, use_cache=True):
    """The oracle: transformers' generate on the same token ids and pixels, left-padded when batched."""
    proc = engine.processor
    width = max(len(p.token_ids) for p in prompts)
    ids = torch.full((len(prompts), width), proc.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p.token_ids):] = p.token_ids
        mask[i, width - len(p.token_ids):] = 1
    pixels = [p.pixel_values for p in prompts if p.pixel_values is not None]
    out = engine.model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pixels) if pixels else None,
                                max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                                eos_token_id=proc.stop_token_ids, pad_token_id=proc.pad_token_id)
    replies = []
    for row in out[:, width:].tolist():
        reply = []
        for t in row:
            if t in proc.stop_token_ids:
                break
            reply.append(t)
        replies.append(reply)
    return replies


def test_greedy_equals_transformers_alone_batched_with_and_without_cache(engine):
    turns = [t for t, _ in REQUESTS]
    params = [greedy(n) for _, n in REQUESTS]
    alone = [engine.generate([t], p) for t, p in zip(turns, params)]
    joined = staggered(engine, turns, params)
    assert [c.token_ids for c in joined] == [c.token_ids for c in alone]
    # The later requests really joined mid-batch: their first token came while the first still ran.
    first = joined[0]
    assert any(first.first_token_at_step < c.first_token_at_step < first.finished_at_step for c in joined[1:])
    assert max(c.peak_batch_size for c in joined) > 1

    prompts = [encode_turns(engine.processor, [t]) for t in turns]
    for prompt, (_, n), completion in zip(prompts, REQUESTS, alone):
        expected = hf_generate(engine, [prompt], n)[0]
        assert completion.token_ids == expected
        assert hf_generate(engine, [prompt], n, use_cache=False)[0] == expected
    longest = max(n for _, n in REQUESTS)
    batched = hf_generate(engine, prompts, longest)
    assert [b[:n] for b, (_, n) in zip(batched, REQUESTS)] == [c.token_ids for c in alone]


def test_a_mid_batch_arrival_gets_its_first_token_within_one_step(checkpoint):
    long_params, short = greedy(40, ignore_eos=True), greedy(4, ignore_eos=True)
    for scheduling in ("continuous", "static"):
        with Engine(EngineConfig(checkpoint, device="cpu", max_batch_size=4, scheduling=scheduling)) as engine:
            running = engine.submit([Turn("user", "Describe the picture.")], long_params)
            next(iter(running))  # decoding has started
            arrival = engine.generate([Turn("user", "hi")], short)
            first = running.result()
        assert first.completion_tokens == 40 and arrival.completion_tokens == 4
        if scheduling == "continuous":
            # Prefilled and given its first token at the next step, long before the running row ends.
            assert arrival.first_token_at_step - arrival.submitted_at_step <= 1
            assert arrival.finished_at_step < first.finished_at_step
            assert arrival.peak_batch_size == 2
        else:  # the static batch runs to its end before anything new is admitted
            assert arrival.first_token_at_step >= first.finished_at_step
            assert arrival.peak_batch_size == 1


def test_static_scheduling_gives_the_same_replies(checkpoint, engine):
    turns = [t for t, _ in REQUESTS]
    params = [greedy(n) for _, n in REQUESTS]
    with Engine(EngineConfig(checkpoint, device="cpu", max_batch_size=4, scheduling="static")) as static:
        handles = [static.submit([t], p) for t, p in zip(turns, params)]
        replies = [h.result() for h in handles]
    assert [c.token_ids for c in replies] == [engine.generate([t], p).token_ids for t, p in zip(turns, params)]


def test_routing_is_counted_per_request_exactly(engine):
    turn = REQUESTS[0][0]
    params = greedy(10, ignore_eos=True)
    alone = engine.generate([turn], params)
    others = [t for t, _ in REQUESTS[1:4]]
    handles = [engine.submit([t], greedy(30, ignore_eos=True)) for t in others]
    for h in handles:
        next(iter(h))  # the others are decoding when the request arrives
    shared = engine.generate([turn], params)
    for h in handles:
        h.result()
    assert shared.peak_batch_size > 1
    assert shared.routing == alone.routing
    # Every token of this request went to top_k experts: its prompt, and each reply token fed back.
    k, n = 2, engine.processor.num_image_tokens
    for layer in shared.routing:
        assert sum(layer["image"]) == n * k
        assert sum(layer["text"]) == (alone.prompt_tokens - n + alone.completion_tokens - 1) * k


def test_cancelling_one_row_leaves_the_others_unchanged(engine):
    keep_turn, keep_params = REQUESTS[3][0], greedy(25)
    expected = engine.generate([keep_turn], keep_params).token_ids
    doomed = engine.submit([Turn("user", "Describe the picture.")], greedy(200, ignore_eos=True))
    next(iter(doomed))
    kept = engine.submit([keep_turn], keep_params)
    next(iter(kept), None)
    doomed.cancel()
    assert doomed.result().finish_reason == "cancelled" and doomed.result().completion_tokens < 200
    assert kept.result().token_ids == expected


def test_close_cancels_what_is_queued_and_running(checkpoint):
    engine = Engine(EngineConfig(checkpoint, device="cpu", max_batch_size=1))
    running = engine.submit([Turn("user", "Describe the picture.")], greedy(400, ignore_eos=True))
    queued = engine.submit([Turn("user", "hi")], greedy(5))
    next(iter(running))
    engine.close()
    assert running.result().finish_reason == "cancelled" and running.result().completion_tokens < 400
    assert queued.result().finish_reason == "cancelled" and queued.result().completion_tokens == 0
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([Turn("user", "hi")])


def test_ignore_eos_runs_to_the_length_asked(checkpoint):
    from llava_smoe import load_pretrained

    model, processor = load_pretrained(checkpoint)
    turn = Turn("user", "hi")
    with Engine(EngineConfig(checkpoint, device="cpu"), model=model, processor=processor) as engine:
        # An untrained model rarely ends a reply: give the end-of-turn token twice the head row of
        # the reply's 5th token, so a greedy reply stops by then.
        fifth = engine.generate([turn], greedy(5, ignore_eos=True)).token_ids[4]
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head[min(processor.stop_token_ids)] = 2 * head[fifth]
        natural = engine.generate([turn], greedy(60))
        assert natural.finish_reason == "stop" and natural.completion_tokens <= 5
        forced = engine.generate([turn], greedy(60, ignore_eos=True))
    assert forced.finish_reason == "length" and forced.completion_tokens == 60
    assert forced.token_ids[:natural.completion_tokens] == natural.token_ids


def test_many_threads_submitting_at_once(engine):
    results = [None] * 12

    def worker(i):
        results[i] = engine.generate([REQUESTS[i % len(REQUESTS)][0]], greedy(8))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    alone = [engine.generate([t], greedy(8)).token_ids for t, _ in REQUESTS]
    assert [r.token_ids for r in results] == [alone[i % len(REQUESTS)] for i in range(12)]
    assert max(r.peak_batch_size for r in results) == 4  # the batch filled up, never beyond its size


def test_mixture_of_tokens_is_refused_until_converted(tmp_path):
    from llava_smoe import load_pretrained
    from llava_smoe.moe import convert_mot_to_token_choice

    checkpoint = save_tiny_checkpoint(str(tmp_path / "mot"), router="mot")
    with pytest.raises(ValueError, match=r"Mixture of Tokens.*convert_mot_to_token_choice"):
        Engine(EngineConfig(checkpoint, device="cpu"))
    model, processor = load_pretrained(checkpoint)
    assert convert_mot_to_token_choice(model) == 2
    with Engine(EngineConfig(), model=model, processor=processor) as engine:
        reply = engine.generate([Turn("user", "hi")], greedy(4, ignore_eos=True))
    assert reply.completion_tokens == 4 and len(reply.routing) == 2


def test_engine_config_validates(checkpoint):
    with pytest.raises(ValueError, match=r"scheduling: 'paged' is not one of \['continuous', 'static'\]"):
        EngineConfig(checkpoint, scheduling="paged")
    with pytest.raises(ValueError, match="needs a checkpoint folder"):
        Engine(EngineConfig())
