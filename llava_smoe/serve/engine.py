"""The generation engine every front end shares (terminal chat, web page, HTTP API).

It owns the model and runs it on one worker thread. Requests are prepared on the caller's
thread (prompt through the checkpoint's own processor, images, context-length check: bad
requests fail there, synchronously), queued, and decoded by the worker in static batches:
whatever is pending when a batch starts (up to `max_batch_size`) is left-padded and decoded
together with one KV cache, finished rows leaving it, until every row has finished; requests
arriving meanwhile wait for the next batch (static batching: simple, and no row ever sees
another's padding change mid-reply). One thread touching the model makes concurrency safe without locks, and the
routing statistics read after a batch belong to that batch alone.

Each request streams text deltas. Decoding is incremental over a small token window and
holds back incomplete UTF-8 sequences and partial stop strings, so the concatenated deltas
equal the final text exactly.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import torch
from PIL import Image

from llava_smoe.serve.config import EngineConfig


class RequestError(ValueError):
    """A request the engine refuses (bad conversation, bad sampling options, too long)."""

    code = "invalid_request"


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


@dataclass
class SamplingParams:
    """temperature 0 is greedy. max_new_tokens None: the engine default, capped by the room
    left in the context. stop: strings that end the reply (not included in it)."""

    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise RequestError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.stop = tuple(self.stop)
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be at most 4 non-empty strings, got {list(self.stop)!r}")


@dataclass
class Turn:
    """One message. Images belong to user turns; each is placed before the turn's text."""

    role: str
    text: str
    images: Sequence[Image.Image] = ()


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    # Per MoE layer: tokens each expert received, split into text and image tokens; counted over
    # the batch this request ran in (`routing_batch_size` requests, padding included).
    routing: list[dict[str, Any]] | None = None
    routing_batch_size: int = 1


class TextStreamer:
    """Token ids in, text deltas out; holds back incomplete characters and partial stop strings."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self._emitted = 0
        # Decode ids[_prefix:] and diff against ids[_prefix:_read]: the preceding tokens give
        # context (leading-space rules of some tokenizers) without re-decoding everything.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (delta, stopped). After `stopped` the text ends before the stop string."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> tuple[str, bool]:
        """End of generation: release everything still held back."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self.text += after[len(before):]
        self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        cut = min((i for i in (self.text.find(s, self._emitted) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            self.text = self.text[:cut]
            delta, self._emitted = self.text[self._emitted:], cut
            return delta, True
        end = len(self.text)
        if not final:
            # A suffix that may grow into a stop string is not released yet.
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = max(self._emitted, end - hold)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta, False


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
            if not self._handle(kind, value):
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
    prompt_ids: torch.Tensor  # [S]
    pixel_values: torch.Tensor | None  # [N, 3, H, W]
    params: SamplingParams
    max_new_tokens: int
    handle: RequestHandle
    streamer: TextStreamer
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


_STOP = object()


class Engine:
    """Loads a checkpoint (model + processor) and serves generation requests from a worker thread."""

    def __init__(self, config: EngineConfig):
        from llava_smoe.moe import moe_layers
        from llava_smoe.pretrained import load_pretrained

        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.model, self.processor = load_pretrained(config.checkpoint, dtype=config.dtype, device=config.device,
                                                     attn_implementation=config.attn_implementation)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        model_context = int(self.model.config.text_config.max_position_embeddings)
        if config.max_context is not None and config.max_context > model_context:
            raise ValueError(
                f"max_context={config.max_context} exceeds the model's max_position_embeddings={model_context}"
            )
        self.max_context = config.max_context or model_context
        self.has_moe = bool(moe_layers(self.model))
        self._suppressed = sorted({self.processor.image_token_id, *(self.model.generation_config.suppress_tokens or [])})
        self._stop_ids = set(self.processor.stop_token_ids)
        self._pending: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="llava-smoe-engine", daemon=True)
        self._worker.start()

    @property
    def model_name(self) -> str:
        return os.path.basename(os.path.normpath(self.config.checkpoint))

    # -- requests -------------------------------------------------------------------------------
    def submit(self, turns: Sequence[Turn], params: SamplingParams | None = None, *,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Validate and queue a request; raises RequestError for anything that cannot be served.
        Pass `loop` to consume the handle with `async for` on that event loop."""
        params = params or SamplingParams()
        prompt_ids, images = self._build_prompt(turns)
        room = self.max_context - len(prompt_ids)
        max_new = params.max_new_tokens or max(1, min(self.config.default_max_new_tokens, room))
        if max_new > room:
            raise ContextLengthError(
                f"this request needs {len(prompt_ids)} prompt tokens + {max_new} new tokens = "
                f"{len(prompt_ids) + max_new}, over the context length of {self.max_context} tokens: shorten the "
                "conversation, send fewer images or ask for fewer new tokens"
            )
        pixel_values = self.processor.preprocess_images(images) if images else None
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        handle = RequestHandle(len(prompt_ids), _Channel(loop))
        self._pending.put(_Request(prompt_ids, pixel_values, params, max_new, handle,
                                   TextStreamer(self.processor.tokenizer, params.stop), generator))
        return handle

    def generate(self, turns: Sequence[Turn], params: SamplingParams | None = None) -> Completion:
        return self.submit(turns, params).result()

    def stream(self, turns: Sequence[Turn], params: SamplingParams | None = None) -> Iterator[str]:
        return iter(self.submit(turns, params))

    def count_prompt_tokens(self, turns: Sequence[Turn]) -> int:
        return len(self._build_prompt(turns)[0])

    def _build_prompt(self, turns: Sequence[Turn]) -> tuple[torch.Tensor, list[Image.Image]]:
        from llava_smoe.processing import ConversationError

        placeholder = self.processor.image_token
        messages, images = [], []
        for i, turn in enumerate(turns):
            if placeholder in turn.text:
                raise RequestError(f"message {i} contains the reserved image token {placeholder!r}; attach images instead")
            if turn.images and turn.role != "user":
                raise RequestError(f"message {i} ({turn.role}) has images; only user messages may carry images")
            images.extend(turn.images)
            messages.append({"role": turn.role, "content": (placeholder + "\n") * len(turn.images) + turn.text})
        try:
            ids = self.processor.build_generation_prompt(messages, has_image=len(images), insert_image_placeholder=False)
        except ConversationError as e:
            raise RequestError(str(e)) from None
        return ids, images

    def close(self) -> None:
        self._pending.put(_STOP)
        self._worker.join(timeout=30)

    # -- worker -----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first = self._pending.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.config.max_batch_size:
                try:
                    nxt = self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._pending.put(_STOP)
                    break
                batch.append(nxt)
            try:
                with torch.inference_mode():
                    self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - reported to every waiting request, worker lives on
                for r in batch:
                    if r.finish_reason is None:
                        r.handle._channel.put(("error", RuntimeError(f"generation failed: {e!r}")))

    def _run_batch(self, batch: list[_Request]) -> None:
        from llava_smoe.moe import routing_stats

        B, S = len(batch), max(len(r.prompt_ids) for r in batch)
        input_ids_BS = torch.full((B, S), self.processor.pad_token_id, dtype=torch.long)
        mask_BS = torch.zeros((B, S), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every row's next token goes at position S
            input_ids_BS[i, S - len(r.prompt_ids):] = r.prompt_ids
            mask_BS[i, S - len(r.prompt_ids):] = 1
        images = [r.pixel_values for r in batch if r.pixel_values is not None]
        inputs = {
            "input_ids": input_ids_BS.to(self.device),
            "attention_mask": mask_BS.to(self.device),
            "position_ids": (mask_BS.cumsum(-1) - 1).clamp_min(0).to(self.device),
            "pixel_values": torch.cat(images).to(self.device, self.dtype) if images else None,
        }
        if self.has_moe:
            routing_stats(self.model, reset=True)
        cache, rows = None, batch  # rows: the requests still generating, in tensor row order
        while True:
            out = self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            next_R = self._sample(out.logits[:, -1, :].float(), rows)
            for r, token in zip(rows, next_R.tolist()):
                self._advance(r, token)
            keep = [j for j, r in enumerate(rows) if r.finish_reason is None]
            if not keep:
                break
            mask = inputs["attention_mask"]
            inputs = {
                "input_ids": next_R[:, None],
                "attention_mask": torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1),
                "position_ids": inputs["position_ids"][:, -1:] + 1,
            }
            if len(keep) < len(rows):  # finished rows leave the batch and its KV cache
                keep_R = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_R)
                inputs = {k: v.index_select(0, keep_R) for k, v in inputs.items()}
                rows = [rows[j] for j in keep]
        routing = _routing_table(routing_stats(self.model, reset=True)) if self.has_moe else None
        for r in batch:
            r.handle._channel.put(("done", Completion(
                text=r.streamer.text,
                finish_reason=r.finish_reason,
                prompt_tokens=len(r.prompt_ids),
                completion_tokens=len(r.token_ids),
                token_ids=r.token_ids,
                routing=routing,
                routing_batch_size=B,
            )))

    def _advance(self, r: _Request, token: int) -> None:
        channel = r.handle._channel
        if r.handle.cancelled:
            r.finish_reason = "cancelled"
            return
        if token in self._stop_ids:
            delta, _ = r.streamer.flush()
            r.finish_reason = "stop"
        else:
            r.token_ids.append(token)
            delta, stopped = r.streamer.push(token)
            if stopped:
                r.finish_reason = "stop"
            elif len(r.token_ids) >= r.max_new_tokens:
                more, stopped = r.streamer.flush()
                delta += more
                r.finish_reason = "stop" if stopped else "length"
        if delta:
            channel.put(("delta", delta))

    def _sample(self, logits_BV: torch.Tensor, batch: list[_Request]) -> torch.Tensor:
        logits_BV[:, self._suppressed] = float("-inf")
        next_B = logits_BV.argmax(-1)
        for i, r in enumerate(batch):
            t, top_p = float(r.params.temperature), float(r.params.top_p)
            if t == 0.0:
                continue
            probs_V = torch.softmax(logits_BV[i] / t, dim=-1)
            if top_p < 1.0:
                sorted_V, order_V = probs_V.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                drop_V = sorted_V.cumsum(0) - sorted_V >= top_p
                sorted_V[drop_V] = 0.0
                probs_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
            next_B[i] = torch.multinomial(probs_V, 1, generator=r.generator)[0]
        return next_B


def _routing_table(stats: dict[str, dict]) -> list[dict[str, Any]]:
    return [
        {"layer": name, "text": [int(c) for c in s.get("tokens_per_expert_text", [])],
         "image": [int(c) for c in s.get("tokens_per_expert_image", [])]}
        for name, s in stats.items() if name != "all"
    ]
