"""Batching: right padding for training, images stacked for the samples that have one."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from llava_smoe.data.dataset import SkippedSample
from llava_smoe.processing.processor import IGNORE_INDEX, LlavaSmoeProcessor


@dataclass
class DataCollator:
    """Collate `LlavaDataset` samples into the model's keyword arguments:
    input_ids / attention_mask (and labels when the samples have them): [B, L], right-padded
    (labels padded with IGNORE_INDEX); pixel_values: [N, 3, S, S] for the N samples with an
    image, in batch order (absent when none has one); `model_kwargs`, the same in every batch
    (e.g. CLIP's return_loss); and `skipped`: {reason: count} of samples dropped under policy
    'skip', which the trainer pops and counts before calling the model."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_processor(cls, processor: LlavaSmoeProcessor, pad_to_multiple_of: int | None = None) -> "DataCollator":
        return cls(processor.pad_token_id, pad_to_multiple_of)

    def __call__(self, samples: Sequence[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = Counter(s.reason for s in samples if isinstance(s, SkippedSample))
        kept = [s for s in samples if not isinstance(s, SkippedSample)]
        batch, longest = len(kept), max((s["input_ids"].numel() for s in kept), default=0)
        if self.pad_to_multiple_of and longest % self.pad_to_multiple_of:
            longest += self.pad_to_multiple_of - longest % self.pad_to_multiple_of
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for b, s in enumerate(kept):
            n = s["input_ids"].numel()
            input_ids[b, :n] = s["input_ids"]
            attention_mask[b, :n] = 1
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if kept and "labels" in kept[0]:
            labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
            for b, s in enumerate(kept):
                labels[b, : s["labels"].numel()] = s["labels"]
            out["labels"] = labels
        images = [s["image"] for s in kept if s.get("image") is not None]
        if images:
            out["pixel_values"] = torch.stack(images)
        out.update(self.model_kwargs)
        out["skipped"] = dict(skipped)
        return out
