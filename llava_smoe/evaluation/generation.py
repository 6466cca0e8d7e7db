"""Generation (through the inference engine) and continuation log-likelihoods (teacher-forced
forwards) over a checkpoint's own processor.

Everything the model sees is built by `LlavaSmoeProcessor` (template, image placeholders,
preprocessing), so evaluation prompts match training prompts token for token. Scoring batches
are right-padded.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from llava_smoe.evaluation.questions import QAItem
from llava_smoe.inference import EncodedPrompt, Engine, EngineConfig, SamplingParams, Turn, encode_turns
from llava_smoe.processing.images import load_image
from llava_smoe.processing.processor import IGNORE_INDEX


def sampling_from_gen_kwargs(gen_kwargs: dict[str, Any], default_max_new_tokens: int = 64) -> SamplingParams:
    """An lmms-eval task's generation_kwargs (`until`, `max_new_tokens`, `temperature`, `top_p`,
    `num_beams`, `do_sample`) as sampling options; keys that only matter to other models are ignored."""
    kw = dict(gen_kwargs)
    if int(kw.get("num_beams") or 1) > 1:
        raise ValueError(f"num_beams={kw['num_beams']}: beam search is not supported; the engine decodes greedily "
                         "or samples (set num_beams to 1)")
    until = kw.get("until") or ()
    temperature = float(kw.get("temperature") or 0.0)
    if kw.get("do_sample") is False:
        temperature = 0.0
    top_p = kw.get("top_p")
    return SamplingParams(
        max_new_tokens=int(kw.get("max_new_tokens") or default_max_new_tokens),
        temperature=temperature,
        top_p=float(top_p) if top_p is not None and temperature > 0 else 1.0,
        stop=tuple(s for s in ((until,) if isinstance(until, str) else until) if s),
    )


@dataclass
class ContinuationScore:
    """A teacher-forced continuation: per target token, its id, log-probability, and whether it
    is the argmax of the model's next-token distribution."""

    token_ids: list[int]
    logprobs: list[float]
    greedy: list[bool]


@dataclass
class Prompt:
    """One user turn (text) with its images; when the text holds no placeholders, the processor
    places them (its `image_position`: first, where LLaVA's data has them, or last)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)


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

    def item_prompts(self, items: Sequence[QAItem], blind: bool = False, suffix: str = "") -> list[Prompt]:
        """A prompt per question item, its image where the record had it (each file loaded once);
        blind: every image replaced by `blank_image()`."""
        blank = self.blank_image() if blind else None
        loaded: dict[str, Image.Image] = {}
        token = self.processor.config.image_token
        prompts = []
        for item in items:
            images = []
            if item.image_path is not None:
                if blank is None and item.image_path not in loaded:
                    loaded[item.image_path] = load_image(item.image_path)
                images = [blank if blank is not None else loaded[item.image_path]]
            prompts.append(Prompt(item.prompt_text(token, suffix), images))
        return prompts

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        """The prompt's token ids (a task's text may place the images itself) and pixel values."""
        return encode_turns(self.processor, [Turn("user", prompt.text, prompt.images)],
                            allow_placeholders_in_text=True)

    def encode_prompt(self, prompt: Prompt) -> torch.Tensor:
        return self.encode(prompt).token_ids

    def prompt_length(self, prompt: Prompt) -> int:
        """Token count without tokenising the images' placeholders (cheap, for sorting)."""
        text_ids = self.processor.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        return len(text_ids) + len(prompt.images) * self.processor.num_image_tokens

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor | None:
        if not images:
            return None
        return self.processor.preprocess_images(images).to(self.device, self.dtype)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, batch_size: int = 8) -> list[str]:
        """Answers (stripped) in the order of `prompts`, generated by the engine with up to
        `batch_size` rows decoding together. A reply is cut to the room its prompt leaves in the
        context; a prompt that fills the context is an error."""
        answers: list[str | None] = [None] * len(prompts)
        in_flight: deque = deque()
        with Engine(EngineConfig(max_batch_size=batch_size), model=self.model, processor=self.processor) as engine:
            for i, prompt in enumerate(prompts):
                encoded = self.encode(prompt)
                room = engine.max_context - len(encoded.token_ids)
                if room < 1:
                    raise ValueError(f"prompt {i} has {len(encoded.token_ids)} tokens, which fill the context of "
                                     f"{engine.max_context} tokens")
                capped = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens or room, room))
                in_flight.append((i, engine.submit_prompt(encoded, capped)))
                # Encoding (image preprocessing) overlaps generation; a bounded window keeps memory flat.
                while len(in_flight) > 2 * batch_size:
                    j, handle = in_flight.popleft()
                    answers[j] = handle.result().text.strip()
            for j, handle in in_flight:
                answers[j] = handle.result().text.strip()
        return answers  # type: ignore[return-value]

    # -- scoring ------------------------------------------------------------------------------
    def encode_continuation(self, prompt: Prompt, continuation: str) -> tuple[torch.Tensor, int]:
        """Token ids of prompt + continuation as the template writes an assistant reply, and the
        prompt's length. The end-of-turn marker is not part of the continuation."""
        conversation = self.processor.place_images(
            [{"role": "user", "content": prompt.text}, {"role": "assistant", "content": continuation}],
            has_image=len(prompt.images))
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
    def continuation_scores(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[ContinuationScore]:
        """Each continuation teacher-forced after its prompt, token by token: the target ids,
        their log-probabilities, and whether each is the model's most likely next token."""
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
        scores = []
        for row, (ids, start) in enumerate(encoded):
            # Position t predicts token t + 1.
            logprobs_CV = F.log_softmax(logits_BSV[row, start - 1 : len(ids) - 1], dim=-1)
            target_C = ids[start:].to(logprobs_CV.device)
            scores.append(ContinuationScore(
                token_ids=target_C.tolist(),
                logprobs=logprobs_CV.gather(1, target_C[:, None]).squeeze(1).tolist(),
                greedy=(logprobs_CV.argmax(-1) == target_C).tolist(),
            ))
        return scores

    def loglikelihood_batch(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, bool]]:
        """(summed log-probability of each continuation, whether greedy decoding produces it)."""
        results = []
        for score in self.continuation_scores(prompts, continuations):
            total = sum(score.logprobs)
            results.append((total if math.isfinite(total) else -math.inf, all(score.greedy)))
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
