"""The inference engine under every front end: HTTP API, web page, terminal chat, lmms-eval and
the exact-match evaluator.

It works on token ids: a request is a prompt (ids, plus pixel values when it has images) and
`SamplingParams`; conversations are turned into ids by the checkpoint's own processor
(`encode_turns`), on the caller's thread, where a bad request fails synchronously. One worker
thread owns the model and schedules continuously: at every step it prefills the requests that
arrived (as many as there are free rows), gives each its first token, adds them to the running
batch, and runs one decoding step for all rows; a row that finishes (stop token, stop string,
length, cancellation) leaves at once. So a request arriving mid-batch waits at most one decoding
step plus its own prefill for its first token. `scheduling="static"` instead admits requests
only when the running batch has finished (the baseline the serving benchmark compares against).

The KV cache is one left-padded cache for the running rows (`batch.RunningBatch`). Routing
statistics are counted per request: every token of the language model's MoE layers is labelled
with its request (`llava_smoe.moe.token_owners`), so `Completion.routing` holds exactly the
tokens of that request's prompt and reply, whoever it shared the batch with.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from llava_smoe.moe import moe_layers, take_owner_counts, token_owners

from .batch import RunningBatch
from .config import EngineConfig
from .sampling import ContextLengthError, RequestError, SamplingParams, sample_tokens
from .streaming import TextStreamer


@dataclass
class Turn:
    """One message. Images belong to user turns; each is placed before the turn's text."""

    role: str
    text: str
    images: Sequence[Image.Image] = ()


@dataclass
class EncodedPrompt:
    """A request as the engine sees it: token ids and the pixel values of its images."""

    token_ids: torch.Tensor  # [S]
    pixel_values: torch.Tensor | None = None  # [N, 3, H, W]


def encode_turns(processor: Any, turns: Sequence[Turn], *, allow_placeholders_in_text: bool = False) -> EncodedPrompt:
    """A conversation as a prompt, built by the checkpoint's processor (which places the images:
    `LlavaSmoeProcessor.place_images`).

    Each turn's images get their placeholders at the start of that turn, and text holding the
    placeholder itself is refused. allow_placeholders_in_text (an evaluation task's prompt): the
    text may place all the images itself; otherwise they go at the start of the first user turn.
    """
    from llava_smoe.processing import ConversationError

    messages = [{"role": t.role, "content": t.text} for t in turns]
    images = [im for t in turns for im in t.images]
    try:
        if allow_placeholders_in_text:
            ids = processor.build_generation_prompt(messages, has_image=len(images))
        else:
            ids = processor.build_generation_prompt(messages, has_image=[len(t.images) for t in turns])
    except ConversationError as e:
        raise RequestError(str(e)) from None
    return EncodedPrompt(ids, processor.preprocess_images(images) if images else None)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    # Per MoE layer of the language model: tokens of this request (prompt and reply) each expert
    # received, split into text and image tokens.
    routing: list[dict[str, Any]] | None = None
    # Most rows decoded together while this request ran (itself included).
    peak_batch_size: int = 1
    # The engine's count of decoding steps when the request was submitted, got its first token
    # and finished: scheduling measured in steps, not seconds.
    submitted_at_step: int = 0
    first_token_at_step: int | None = None
    finished_at_step: int = 0


class _Channel:
    """Events from the worker to one consumer: a thread queue, or an asyncio queue on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.queue: Any = asyncio.Queue() if loop is not None else queue.Queue()

    def put(self, event: tuple[str, Any]) -> None:
        if self.loop is None:
            self.queue.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop is gone
            pass


class RequestHandle:
    """A submitted request: iterate (sync or async) for text deltas; `result()` for the Completion."""

    def __init__(self, prompt_tokens: int, channel: _Channel):
        self.prompt_tokens = prompt_tokens
        self._channel = channel
        self._cancelled = threading.Event()
        self._completion: Completion | None = None

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the reply ends with finish_reason 'cancelled'."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _handle(self, kind: str, value: Any) -> bool:
        if kind == "error":
            raise value
        if kind == "done":
            self._completion = value
            return True
        return False

    def __iter__(self) -> Iterator[str]:
        if self._channel.loop is not None:
            raise TypeError("this request was submitted with an event loop: iterate it with `async for`")
        while self._completion is None:
            kind, value = self._channel.queue.get()
            if not self._handle(kind, value):
                yield value

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._channel.loop is None:
            raise TypeError("this request was submitted without an event loop: iterate it with `for`")
        while self._completion is None:
            kind, value = await self._channel.queue.get()
            if self._handle(kind, value):
                break
            # Deltas that arrived meanwhile go out together: a busy event loop sends fewer, larger chunks.
            while not self._channel.queue.empty() and self._completion is None:
                kind, more = self._channel.queue.get_nowait()
                if not self._handle(kind, more):
                    value += more
            yield value

    def result(self) -> Completion:
        for _ in self:
            pass
        assert self._completion is not None
        return self._completion

    async def aresult(self) -> Completion:
        async for _ in self:
            pass
        assert self._completion is not None
        return self._completion


@dataclass
class _Request:
    prompt: EncodedPrompt
    params: SamplingParams
    max_new_tokens: int
    handle: RequestHandle
    streamer: TextStreamer
    generator: torch.Generator | None
    submitted_at_step: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int = -1  # its row of the per-request routing counts while it runs
    peak_batch_size: int = 0
    first_token_at_step: int | None = None


_STOP = object()


class Engine:
    """Serves generation requests for one model from a worker thread.

    `Engine(EngineConfig(checkpoint=...))` loads a checkpoint (model + processor);
    `Engine(config, model=..., processor=...)` runs a model already loaded (in-process
    evaluation). Use as a context manager, or call `close()`.
    """

    def __init__(self, config: EngineConfig, *, model: Any = None, processor: Any = None):
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if model is None:
            if config.checkpoint is None:
                raise ValueError("the engine needs a checkpoint folder (EngineConfig.checkpoint) or a model and processor")
            from llava_smoe.pretrained import load_pretrained

            model, processor = load_pretrained(config.checkpoint, dtype=config.dtype, device=config.device,
                                               attn_implementation=config.attn_implementation)
        elif processor is None:
            raise ValueError("a model given to the engine needs its processor")
        self.model, self.processor = model, processor  # a model handed in keeps its mode (evaluation mid-training)
        _refuse_batch_mixing(model)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        model_context = int(self.model.config.text_config.max_position_embeddings)
        if config.max_context is not None and config.max_context > model_context:
            raise ValueError(
                f"max_context={config.max_context} exceeds the model's max_position_embeddings={model_context}"
            )
        self.max_context = config.max_context or model_context
        self._suppressed = sorted({self.processor.image_token_id, *(self.model.generation_config.suppress_tokens or [])})
        self._stop_ids = set(self.processor.stop_token_ids)
        # Per-request routing: the language model's MoE layers, counted into one row per batch slot.
        lm_layers = {id(m) for m in getattr(self.model, "_lm_moe_layers", [])}
        self._moe = [(name, m) for name, m in moe_layers(self.model) if id(m) in lm_layers]
        self._slots = config.max_batch_size
        self._routing: list[torch.Tensor] = [
            torch.zeros(self._slots, 2, m.config.num_experts, dtype=torch.float64, device=self.device)
            for _, m in self._moe
        ]
        self._free_slots = list(range(self._slots))
        self._rows: list[_Request] = []  # running requests, in the batch's row order
        self._batch = RunningBatch()
        self._next_R: torch.Tensor | None = None  # each running row's last sampled token
        self.decode_steps = 0
        self._pending: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="llava-smoe-engine", daemon=True)
        self._worker.start()

    @property
    def model_name(self) -> str:
        if self.config.checkpoint is None:
            return type(self.model).__name__
        return os.path.basename(os.path.normpath(self.config.checkpoint))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------------
    def submit(self, turns: Sequence[Turn], params: SamplingParams | None = None, *,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Encode a conversation with the checkpoint's processor and queue it; raises RequestError
        for anything that cannot be served. Pass `loop` to consume the handle with `async for`."""
        return self.submit_prompt(encode_turns(self.processor, turns), params, loop=loop)

    def submit_prompt(self, prompt: EncodedPrompt, params: SamplingParams | None = None, *,
                      loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a prompt already in token ids; refused (ContextLengthError) when it cannot fit."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        params = params or SamplingParams()
        num_prompt = len(prompt.token_ids)
        room = self.max_context - num_prompt
        max_new = params.max_new_tokens or max(1, min(self.config.default_max_new_tokens, room))
        if max_new > room:
            raise ContextLengthError(
                f"this request needs {num_prompt} prompt tokens + {max_new} new tokens = "
                f"{num_prompt + max_new}, over the context length of {self.max_context} tokens: shorten the "
                "conversation, send fewer images or ask for fewer new tokens"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        handle = RequestHandle(num_prompt, _Channel(loop))
        self._pending.put(_Request(prompt, params, max_new, handle, TextStreamer(self.processor.tokenizer, params.stop),
                                   generator, submitted_at_step=self.decode_steps))
        return handle

    def generate(self, turns: Sequence[Turn], params: SamplingParams | None = None) -> Completion:
        return self.submit(turns, params).result()

    def stream(self, turns: Sequence[Turn], params: SamplingParams | None = None) -> Iterator[str]:
        return iter(self.submit(turns, params))

    def count_prompt_tokens(self, turns: Sequence[Turn]) -> int:
        return len(encode_turns(self.processor, turns).token_ids)

    def close(self) -> None:
        """Stop the worker; requests still queued or running end as 'cancelled'."""
        if not self._closed:
            self._closed = True
            self._pending.put(_STOP)
            self._worker.join(timeout=60)

    # -- worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._closed:
            new, stopping = self._admit()
            try:
                with torch.inference_mode():
                    if new:
                        self._prefill(new)
                    if self._rows and not stopping:
                        self._decode()
            except Exception as e:  # noqa: BLE001 - reported to the requests involved, the worker lives on
                error = RuntimeError(f"generation failed: {e!r}")
                for r in [*self._rows, *new]:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.handle._channel.put(("error", error))
                self._reset()
        for r in self._rows:
            self._finish(r, "cancelled")
        while True:
            try:
                r = self._pending.get_nowait()
            except queue.Empty:
                return
            if r is not _STOP:
                self._finish(r, "cancelled")

    def _admit(self) -> tuple[list[_Request], bool]:
        """Requests to prefill now (up to the free rows) and whether the engine is stopping."""
        if self.config.scheduling == "static" and self._rows:
            return [], False  # static batching: the running batch finishes first
        new: list[_Request] = []
        while len(self._rows) + len(new) < self.config.max_batch_size:
            try:  # wait only when there is nothing else to do
                r = self._pending.get(block=not self._rows and not new)
            except queue.Empty:
                break
            if r is _STOP:
                return new, True
            if r.handle.cancelled:
                self._finish(r, "cancelled")
                continue
            new.append(r)
        return new, False

    def _prefill(self, new: list[_Request]) -> None:
        """Run the new requests' prompts (left-padded together), sample their first tokens and add
        the ones still going to the running batch."""
        B, S = len(new), max(len(r.prompt.token_ids) for r in new)
        input_ids_BS = torch.full((B, S), self.processor.pad_token_id, dtype=torch.long)
        mask_BS = torch.zeros((B, S), dtype=torch.long)
        owners_BS = torch.full((B, S), self._slots, dtype=torch.long)  # padding: owner out of range
        for i, r in enumerate(new):
            r.slot = self._free_slots.pop(0)
            for counts in self._routing:
                counts[r.slot].zero_()
            n = len(r.prompt.token_ids)
            input_ids_BS[i, S - n:] = r.prompt.token_ids
            mask_BS[i, S - n:] = 1
            owners_BS[i, S - n:] = r.slot
        images = [r.prompt.pixel_values for r in new if r.prompt.pixel_values is not None]
        mask_BS = mask_BS.to(self.device)
        cache = DynamicCache()
        with token_owners([m for _, m in self._moe], owners_BS.to(self.device), self._slots):
            out = self.model(
                input_ids=input_ids_BS.to(self.device), attention_mask=mask_BS,
                position_ids=(mask_BS.cumsum(-1) - 1).clamp_min(0),
                pixel_values=torch.cat(images).to(self.device, self.dtype) if images else None,
                cache=cache, use_cache=True, logits_to_keep=1,
            )
        self._count_routing()
        next_B = self._sample(out.logits[:, -1, :], new)
        keep = self._advance(new, next_B.tolist())
        if keep:
            keep_R = torch.tensor(keep, device=self.device)
            if len(keep) < B:  # rows done after their first token never join
                cache.batch_select_indices(keep_R)
                mask_BS = mask_BS.index_select(0, keep_R)
            self._batch.join(cache, mask_BS)
            self._rows += [new[i] for i in keep]
            next_R = next_B[keep_R]
            self._next_R = next_R if self._next_R is None else torch.cat([self._next_R, next_R])

    def _decode(self) -> None:
        """One token for every running row; finished rows leave the batch."""
        rows = self._rows
        slots_R = torch.tensor([r.slot for r in rows], device=self.device)
        with token_owners([m for _, m in self._moe], slots_R[:, None], self._slots):
            out = self.model(input_ids=self._next_R[:, None], cache=self._batch.cache, use_cache=True,
                             logits_to_keep=1, **self._batch.step_inputs())
        self._batch.advance()
        self.decode_steps += 1
        self._count_routing()
        for r in rows:
            r.peak_batch_size = max(r.peak_batch_size, len(rows))
        next_R = self._sample(out.logits[:, -1, :], rows)
        keep = self._advance(rows, next_R.tolist())
        if len(keep) < len(rows):
            keep_R = torch.tensor(keep, device=self.device, dtype=torch.long)
            self._batch.keep(keep_R)
            next_R = next_R[keep_R]
            self._rows = [rows[i] for i in keep]
        self._next_R = next_R if self._rows else None

    def _count_routing(self) -> None:
        for acc, counts in zip(self._routing, take_owner_counts([m for _, m in self._moe])):
            if counts is not None:
                acc += counts

    def _sample(self, logits_BV: torch.Tensor, rows: list[_Request]) -> torch.Tensor:
        logits_BV = logits_BV.float()
        logits_BV[:, self._suppressed] = float("-inf")
        return sample_tokens(logits_BV, [r.params for r in rows], [r.generator for r in rows])

    def _advance(self, rows: list[_Request], tokens: list[int]) -> list[int]:
        """Give each row its token; finish the rows that are done. Returns the rows still going."""
        keep = []
        for i, (r, token) in enumerate(zip(rows, tokens)):
            r.peak_batch_size = max(r.peak_batch_size, 1)
            if r.first_token_at_step is None:
                r.first_token_at_step = self.decode_steps
            if r.handle.cancelled:
                self._finish(r, "cancelled")
                continue
            finish = None
            if token in self._stop_ids and not r.params.ignore_eos:
                delta, _ = r.streamer.flush()
                finish = "stop"
            else:
                r.token_ids.append(token)
                delta, stopped = r.streamer.push(token)
                if stopped:
                    finish = "stop"
                elif len(r.token_ids) >= r.max_new_tokens:
                    more, stopped = r.streamer.flush()
                    delta += more
                    finish = "stop" if stopped else "length"
            if delta:
                r.handle._channel.put(("delta", delta))
            if finish is None:
                keep.append(i)
            else:
                self._finish(r, finish)
        return keep

    def _finish(self, r: _Request, reason: str) -> None:
        r.finish_reason = reason
        routing = None
        if r.slot >= 0:
            if self._moe:
                routing = [{"layer": name, "text": [int(c) for c in acc[r.slot, 0].tolist()],
                            "image": [int(c) for c in acc[r.slot, 1].tolist()]}
                           for (name, _), acc in zip(self._moe, self._routing)]
            self._free_slots.append(r.slot)
            r.slot = -1
        r.handle._channel.put(("done", Completion(
            text=r.streamer.text,
            finish_reason=reason,
            prompt_tokens=len(r.prompt.token_ids),
            completion_tokens=len(r.token_ids),
            token_ids=r.token_ids,
            routing=routing,
            peak_batch_size=r.peak_batch_size,
            submitted_at_step=r.submitted_at_step,
            first_token_at_step=r.first_token_at_step,
            finished_at_step=self.decode_steps,
        )))

    def _reset(self) -> None:
        """After a failed forward: no running rows, every slot free."""
        self._rows, self._batch, self._next_R = [], RunningBatch(), None
        self._free_slots = list(range(self._slots))
        take_owner_counts([m for _, m in self._moe])


def _refuse_batch_mixing(model: Any) -> None:
    """Mixture of Tokens mixes the sequences of a batch: served together, requests would change
    each other's replies. Only its token-choice conversion is served."""
    mixing = [name for name, m in moe_layers(model) if m.config.router == "mot"]
    if mixing:
        raise ValueError(
            f"MoE layers {mixing[:3]}{' ...' if len(mixing) > 3 else ''} use Mixture of Tokens (router 'mot'), which "
            "mixes the sequences of a batch, so requests served together would change each other's replies. "
            "Convert it to token-choice routing first: a vlm training stage with `mot_to_token_choice` converts "
            "and fine-tunes it; in code, llava_smoe.moe.convert_mot_to_token_choice(model)"
        )
