"""Batching: right padding for training, images stacked for the samples that have one."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from llava_smoe.data.dataset import SkippedSample
from llava_smoe.processing.processor import IGNORE_INDEX, LlavaSmoeProcessor


@dataclass
class DataCollator:
    """Collate `LlavaDataset` samples into
    input_ids / labels / attention_mask: [B, L] (right-padded; labels padded with IGNORE_INDEX),
    images: [N, 3, S, S] for the N samples with an image, in batch order (N may be 0),
    has_image: bool [B] (which samples own those images),
    skipped: {reason: count} for samples dropped under policy 'skip' (pop it before the model)."""

    pad_token_id: int
    image_size: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_processor(cls, processor: LlavaSmoeProcessor, pad_to_multiple_of: int | None = None) -> "DataCollator":
        return cls(processor.pad_token_id, processor.image_config.image_size, pad_to_multiple_of)

    def __call__(self, samples: Sequence[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = Counter(s.reason for s in samples if isinstance(s, SkippedSample))
        kept = [s for s in samples if not isinstance(s, SkippedSample)]
        batch, longest = len(kept), max((s["input_ids"].numel() for s in kept), default=0)
        if self.pad_to_multiple_of and longest % self.pad_to_multiple_of:
            longest += self.pad_to_multiple_of - longest % self.pad_to_multiple_of
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for b, s in enumerate(kept):
            n = s["input_ids"].numel()
            input_ids[b, :n] = s["input_ids"]
            labels[b, :n] = s["labels"]
            attention_mask[b, :n] = 1
        images = [s["image"] for s in kept if s["image"] is not None]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "images": torch.stack(images) if images else torch.zeros(0, 3, self.image_size, self.image_size),
            "has_image": torch.tensor([s["image"] is not None for s in kept], dtype=torch.bool),
            "skipped": dict(skipped),
        }
