"""Batched generation and continuation log-likelihoods over a checkpoint's own processor.

Everything the model sees is built by `LlavaSmoeProcessor` (template, image placeholders,
preprocessing), so evaluation prompts match training prompts token for token. Batches are
LEFT-padded for generation (every row's next token sits in the last column) and right-padded
for scoring.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from llava_smoe.processing.processor import IGNORE_INDEX


@dataclass
class GenerationOptions:
    """Decoding settings. temperature 0 is greedy (or beam search with num_beams > 1);
    `stop` strings end a sequence and are cut from the returned text."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an int >= 1, got {self.num_beams!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict[str, Any], default_max_new_tokens: int = 64) -> GenerationOptions:
        """From an lmms-eval task's generation_kwargs (`until`, `max_new_tokens`, `temperature`,
        `top_p`, `num_beams`, `do_sample`); keys that only matter to other models are ignored."""
        kw = dict(gen_kwargs)
        until = kw.get("until") or ()
        temperature = float(kw.get("temperature") or 0.0)
        if kw.get("do_sample") is False:
            temperature = 0.0
        top_p = kw.get("top_p")
        return cls(
            max_new_tokens=int(kw.get("max_new_tokens") or default_max_new_tokens),
            temperature=temperature,
            top_p=float(top_p) if top_p is not None and temperature > 0 else None,
            num_beams=int(kw.get("num_beams") or 1),
            stop=(until,) if isinstance(until, str) else tuple(until),
        )


@dataclass
class Prompt:
    """One user turn (text) with its images; placeholders are added at the start of the text
    when it has none (where LLaVA training data puts them)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches, longest first: similar lengths pad little, and memory errors show up at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


class InferenceRunner:
    """Model + processor: prompt encoding, batched generation and continuation scoring."""

    def __init__(self, model: torch.nn.Module, processor: Any):
        self.model = model
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def blank_image(self) -> Image.Image:
        """A plain image in the encoder's mean colour (the padding colour): the 'no image' probe."""
        size = self.processor.image_config.image_size
        return Image.new("RGB", (size, size), self.processor.image_config.mean_color)

    def _with_placeholders(self, text: str, num_images: int) -> str:
        token = self.processor.image_token
        if num_images and token not in text:
            return (token + "\n") * num_images + text
        return text

    def encode_prompt(self, prompt: Prompt) -> torch.Tensor:
        messages = [{"role": "user", "content": self._with_placeholders(prompt.text, len(prompt.images))}]
        return self.processor.build_generation_prompt(messages, has_image=len(prompt.images))

    def prompt_length(self, prompt: Prompt) -> int:
        """Token count without tokenising the images' placeholders (cheap, for sorting)."""
        text_ids = self.processor.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        return len(text_ids) + len(prompt.images) * self.processor.num_image_tokens

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor | None:
        if not images:
            return None
        return self.processor.preprocess_images(images).to(self.device, self.dtype)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: routing statistics kept on the model must stay updatable
    def generate_batch(self, prompts: Sequence[Prompt], options: GenerationOptions) -> list[str]:
        """One forward batch; rows are left-padded."""
        ids = [self.encode_prompt(p) for p in prompts]
        width = max(len(x) for x in ids)
        pad = self.processor.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = x
            attention_mask[row, width - len(x):] = 1
        sample = options.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=options.max_new_tokens,
            do_sample=sample,
            num_beams=options.num_beams,
            pad_token_id=pad,
            eos_token_id=list(self.processor.stop_token_ids),
        )
        if sample:
            kwargs.update(temperature=options.temperature, top_p=options.top_p if options.top_p is not None else 1.0)
        else:  # unset sampling knobs a checkpoint's generation_config may carry (they warn under greedy)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if options.stop:
            kwargs.update(stop_strings=list(options.stop), tokenizer=self.processor.tokenizer)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            pixel_values=self._pixels([im for p in prompts for im in p.images]),
            **kwargs,
        )
        texts = [self.processor.decode(row[width:]) for row in out.cpu()]
        return [truncate_at_stop(t, options.stop).strip() for t in texts]

    def generate(self, prompts: Sequence[Prompt], options: GenerationOptions, batch_size: int = 8) -> list[str]:
        """Answers in the order of `prompts`; batches are formed by length."""
        answers: list[str | None] = [None] * len(prompts)
        for batch in sorted_batches([self.prompt_length(p) for p in prompts], batch_size):
            for i, text in zip(batch, self.generate_batch([prompts[i] for i in batch], options)):
                answers[i] = text
        return answers  # type: ignore[return-value]

    # -- scoring ------------------------------------------------------------------------------
    def encode_continuation(self, prompt: Prompt, continuation: str) -> tuple[torch.Tensor, int]:
        """Token ids of prompt + continuation as the template writes an assistant reply, and the
        prompt's length. The end-of-turn marker is not part of the continuation."""
        conversation = [
            {"role": "user", "content": self._with_placeholders(prompt.text, len(prompt.images))},
            {"role": "assistant", "content": continuation},
        ]
        sample = self.processor.encode_conversation(conversation, has_image=len(prompt.images))
        input_ids, labels = sample["input_ids"], sample["labels"]
        supervised = (labels != IGNORE_INDEX).nonzero().flatten()
        if supervised.numel() == 0:
            raise ValueError(f"template {self.processor.config.template!r} supervises no token of {continuation!r}")
        start, end = int(supervised[0]), int(supervised[-1]) + 1
        stops = set(self.processor.stop_token_ids)
        while end > start and int(input_ids[end - 1]) in stops:
            end -= 1
        if end == start:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        return input_ids[:end], start

    @torch.no_grad()  # not inference_mode: routing statistics kept on the model must stay updatable
    def loglikelihood_batch(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(summed log-probability of each continuation, whether greedy decoding produces it)."""
        encoded = [self.encode_continuation(p, c) for p, c in zip(prompts, continuations)]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), self.processor.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        logits_BSV = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            pixel_values=self._pixels([im for p in prompts for im in p.images]),
        ).logits.float()
        results = []
        for row, (ids, start) in enumerate(encoded):
            # Position t predicts token t + 1.
            logprobs_CV = F.log_softmax(logits_BSV[row, start - 1 : len(ids) - 1], dim=-1)
            target_C = ids[start:].to(logprobs_CV.device)
            total = logprobs_CV.gather(1, target_C[:, None]).sum().item()
            greedy = bool((logprobs_CV.argmax(-1) == target_C).all())
            results.append((total if math.isfinite(total) else -math.inf, greedy))
        return results

    def loglikelihood(self, prompts: Sequence[Prompt], continuations: Sequence[str],
                      batch_size: int = 8) -> list[tuple[float, bool]]:
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        results: list[tuple[float, bool] | None] = [None] * len(prompts)
        lengths = [self.prompt_length(p) + len(c) for p, c in zip(prompts, continuations)]
        for batch in sorted_batches(lengths, batch_size):
            scored = self.loglikelihood_batch([prompts[i] for i in batch], [continuations[i] for i in batch])
            for i, r in zip(batch, scored):
                results[i] = r
        return results  # type: ignore[return-value]
