"""`clip`: pretraining of a vision tower on captions (CLIP's contrastive loss) or on answers.

Where no pretrained encoder fits (a new image domain, or the tiny from-config tower of the
embedded default), this stage gives the tower features that tell images apart by everything
their captions say before a projector learns to feed them to the LM. Trained through the LM
alone, a from-scratch tower keeps only what the LM reads first (in the shapes world: colour,
~90% of the feature variance) and the LM never learns to read the rest (shape); contrasting
captions that differ in a single shape forces the tower to encode it.

The model is transformers' `CLIPModel` built from `model:` (a `CLIPConfig` dict; the text
vocabulary is sized from the tokenizer). `OUTPUT_DIR/final` is a standard CLIP checkpoint (with
`preprocessor_config.json` and the tokenizer): a VLM stage loads its vision half with
`vision: {backend: hf, name_or_path: OUTPUT_DIR/final}`.

Records are LLaVA JSON/JSONL; a record's caption is its first assistant turn, and records
without an image are bad samples (`on_bad_sample`). The loss contrasts the samples of one
micro-batch on one process (features are not gathered across processes).

`objective: answers` is for data without captions: the text half reads each question of a
record, and a small head over the vision half's tokens and that question picks the answer among
the training set's answers. Captions made of joined questions and answers rarely need what few
questions ask (a shape, when most ask a colour), so a contrastive tower learns little of it; a
classifier must. A tiny tower trained from scratch on a few thousand images memorises them
instead of learning shape, which `augment` (random shifts, mirroring; llava_smoe/data/augment.py)
counters; both change what an image says about where things are, so they are off unless asked.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

from llava_smoe.config import Config, ConfigError, invalid
from llava_smoe.data import DataCollator, DataConfig, LlavaDataset
from llava_smoe.data.augment import AugmentConfig, augment_in_training
from llava_smoe.data.dataset import SkippedSample
from llava_smoe.data.records import BadSampleError, BadSamplePolicy
from llava_smoe.model.vision import (  # a new tower can use its family's constants
    CLIP_MEAN,
    CLIP_STD,
)
from llava_smoe.training.tasks import TaskParts, register_task


@dataclass
class ClipTaskConfig(Config):
    """data / eval_data: LLaVA JSON or JSONL (data may list several); the caption is the first
        assistant turn; image paths are relative to image_folder.
    tokenizer: tokenizer folder for the captions.
    model: a transformers `CLIPConfig` dict ({text_config, vision_config, projection_dim, ...});
        text_config.vocab_size / eos / pad ids are set from the tokenizer.
    max_length: longest caption (or question) in tokens (end token included).
    cache_samples: keep built samples in memory after their first use (data that fits in RAM).
    objective: "contrastive" (captions) or "answers" (every question-answer turn pair of a
        record: classify the answer among the training data's answers; an eval answer outside
        them is a bad sample, "unknown_answer").
    answer_head_width: hidden width of the answers objective's head (not exported).
    augment: training-time image augmentation (llava_smoe.data.augment), for either objective.
    """

    data: str | list[str]
    tokenizer: str
    model: dict[str, Any] = field(default_factory=dict)
    image_folder: str | None = None
    eval_data: str | None = None
    max_length: int = 77
    on_bad_sample: BadSamplePolicy = "error"
    cache_samples: bool = False
    objective: Literal["contrastive", "answers"] = "contrastive"
    answer_head_width: int = 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if "vision_config" not in self.model or "text_config" not in self.model:
            raise invalid("model", "needs text_config and vision_config (a transformers CLIPConfig dict)")
        if self.max_length < 2:
            raise invalid("max_length", f"must be >= 2, got {self.max_length}")
        if self.answer_head_width < 1:
            raise invalid("answer_head_width", f"must be >= 1, got {self.answer_head_width}")


class CaptionDataset(LlavaDataset):
    """(caption tokens + end token, image) pairs from LLaVA records, with LlavaDataset's checks
    and bad-sample policy; a record without an image is a bad sample ("no_image")."""

    def __init__(self, config: DataConfig, processor, end_token_id: int):
        self.end_token_id = end_token_id
        super().__init__(config, processor)

    def _check(self, record_index: int):
        info = super()._check(record_index)
        if not info.has_image:
            raise BadSampleError("no_image", "contrastive pretraining needs an image in every record",
                                 source=self.config.data_path, index=record_index, record_id=info.record_id)
        return info

    def _build(self, i: int) -> dict[str, Any]:
        caption = next(m.content for m in self._messages(self.record_index(i)) if m.role == "assistant")
        ids = self.processor.tokenizer(caption, add_special_tokens=False)["input_ids"] + [self.end_token_id]
        if len(ids) > self.config.max_length:
            raise self._bad(i, "too_long", f"caption is {len(ids)} tokens, longer than max_length="
                                           f"{self.config.max_length}")
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "image": self._image(i)}


class AnswerDataset(CaptionDataset):
    """One sample per record: its image and every (question tokens + end token, answer index)
    turn pair. `answers` (answer text -> index) is set once the training answers are known."""

    answers: dict[str, int] | None = None

    def pairs(self, i: int) -> list[tuple[str, str]]:
        messages = self._messages(self.record_index(i))
        image_token = self.processor.image_token
        return [(q.content.replace(image_token, "").strip(), a.content.strip())
                for q, a in pairwise(messages) if q.role == "user" and a.role == "assistant"]

    def _build(self, i: int) -> dict[str, Any]:
        questions, answer_ids = [], []
        for question, answer in self.pairs(i):
            if answer not in self.answers:
                raise self._bad(i, "unknown_answer", f"answer {answer!r} is not among the training data's answers")
            ids = self.processor.tokenizer(question, add_special_tokens=False)["input_ids"] + [self.end_token_id]
            if len(ids) > self.config.max_length:
                raise self._bad(i, "too_long", f"question is {len(ids)} tokens, longer than max_length="
                                               f"{self.config.max_length}")
            questions.append(torch.tensor(ids, dtype=torch.long))
            answer_ids.append(self.answers[answer])
        return {"questions": questions, "answer_ids": answer_ids, "image": self._image(i)}


@dataclass
class AnswerCollator:
    """Question turns of a batch's records: input_ids / attention_mask [Q, L], right-padded;
    image_index [Q] (each question's image in pixel_values [N, 3, S, S]); answer_ids [Q]."""

    pad_token_id: int

    def __call__(self, samples: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        kept = [s for s in samples if not isinstance(s, SkippedSample)]
        text = DataCollator(self.pad_token_id)([{"input_ids": q} for s in kept for q in s["questions"]])
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "pixel_values": torch.stack([s["image"] for s in kept]),
                "image_index": torch.tensor([b for b, s in enumerate(kept) for _ in s["questions"]], dtype=torch.long),
                "answer_ids": torch.tensor([a for s in kept for a in s["answer_ids"]], dtype=torch.long),
                "skipped": dict(Counter(s.reason for s in samples if isinstance(s, SkippedSample)))}


class AnswerTower(nn.Module):
    """A CLIP model trained to answer: its text half reads a question, and an MLP over that and
    every token of the vision half (flattened, so where things are survives) scores the answers."""

    def __init__(self, clip: nn.Module, num_answers: int, width: int):
        super().__init__()
        self.clip = clip
        vision, text = clip.config.vision_config, clip.config.text_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        self.head = nn.Sequential(nn.Linear(tokens * vision.hidden_size + text.hidden_size, width), nn.GELU(),
                                  nn.Linear(width, num_answers))

    def forward(self, input_ids, attention_mask, pixel_values, image_index, answer_ids):
        image_NTH = self.clip.vision_model(pixel_values=pixel_values).last_hidden_state
        question_QH = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        logits_QA = self.head(torch.cat([image_NTH.flatten(1)[image_index], question_QH], dim=-1))
        return AnswerOutput(loss=F.cross_entropy(logits_QA, answer_ids), logits=logits_QA)


@dataclass
class AnswerOutput:
    loss: torch.Tensor
    logits: torch.Tensor


def build_clip_model(spec: dict[str, Any], tokenizer) -> torch.nn.Module:
    """CLIPModel from a CLIPConfig dict, its text vocabulary sized to `tokenizer` plus an end token."""
    from transformers import CLIPConfig, CLIPModel

    spec = json.loads(json.dumps(spec))  # a private copy
    # The end token gets its own id, the largest: CLIP pools the text at the end token, found
    # either by id or (legacy configs, eos_token_id == 2) as the argmax of the ids.
    end_id = len(tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    spec["text_config"].update(vocab_size=end_id + 1, eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=bos)
    return CLIPModel(CLIPConfig(**spec))


@register_task("clip", ClipTaskConfig)
def build_clip(config: ClipTaskConfig, run) -> TaskParts:
    from transformers import AutoTokenizer

    from llava_smoe.processing import (
        ImageProcessingConfig,
        LlavaSmoeProcessor,
        ProcessorConfig,
    )

    if not Path(config.tokenizer).is_dir():
        raise ConfigError(f"{config.tokenizer} is not a folder", ("tokenizer",))
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{config.tokenizer} has no pad token", ("tokenizer",))
    image_size = config.model["vision_config"].get("image_size", 224)
    # The processor supplies the image pipeline and LlavaDataset's record checks (it adds the
    # image token to the tokenizer first, so the text tower's vocabulary includes it).
    processor = LlavaSmoeProcessor(tokenizer, ProcessorConfig(
        template="plain", num_image_tokens=1,
        image=ImageProcessingConfig(image_size=image_size, mean=CLIP_MEAN, std=CLIP_STD)))
    model = build_clip_model(config.model, processor.tokenizer)
    text = model.config.text_config
    if config.max_length > text.max_position_embeddings:
        raise ConfigError(f"{config.max_length} exceeds model.text_config.max_position_embeddings="
                          f"{text.max_position_embeddings}", ("max_length",))

    answers = config.objective == "answers"

    def dataset(path: str) -> CaptionDataset:
        return (AnswerDataset if answers else CaptionDataset)(
            DataConfig(path, config.image_folder, config.max_length, config.on_bad_sample, cache=config.cache_samples),
            processor, text.eos_token_id)

    paths = [config.data] if isinstance(config.data, str) else list(config.data)
    parts = [dataset(p) for p in paths]
    eval_dataset = dataset(config.eval_data) if config.eval_data else None
    if answers:
        vocabulary = sorted({a for part in parts for i in range(len(part)) for _, a in part.pairs(i)})
        if not vocabulary:
            raise ConfigError(f"{paths}: no record has a question and an answer", ("data",))
        for part in [*parts, *([eval_dataset] if eval_dataset else [])]:
            part.answers = {a: k for k, a in enumerate(vocabulary)}
        model = AnswerTower(model, len(vocabulary), config.answer_head_width)
        collate_fn = AnswerCollator(processor.pad_token_id)
    else:
        collate_fn = DataCollator(processor.pad_token_id, model_kwargs={"return_loss": True})
    augment_in_training(model, config.augment)

    def export_fn(m: torch.nn.Module, out_dir: Path) -> None:
        from transformers import CLIPImageProcessor

        (m.clip if answers else m).save_pretrained(out_dir)  # the answers head is not part of the tower
        processor.tokenizer.save_pretrained(out_dir)
        CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), size={"shortest_edge": image_size},
                           crop_size={"height": image_size, "width": image_size}).save_pretrained(out_dir)

    return TaskParts(
        model=model,
        train_dataset=parts[0] if len(parts) == 1 else ConcatDataset(parts),
        eval_dataset=eval_dataset,
        collate_fn=collate_fn,
        export_fn=export_fn,
    )
