"""A map-style dataset over LLaVA records, with an explicit bad-sample policy.

Each record is validated once, at construction: a cheap pass checks its structure and that its
image file exists (no image decoding, no tokenisation); building a sample later trusts it.

How skipping works (policy "skip"):
1. Bad records found by that pass are left out of the index and counted in
   `dataset.skip_stats`; the sampler never sees them.
2. Problems that need the real work (an image that does not decode, a sample longer than
   `max_length`) are found in `__getitem__`, possibly inside a DataLoader worker. There the
   dataset returns a `SkippedSample`, which `DataCollator` drops and counts in the batch under
   `"skipped"` ({reason: count}), so counts reach the training process whatever the number of
   workers. A batch may therefore hold fewer samples than asked (or none).
The first skips of each reason (per process) are logged with the record's file, index and id. Policy "error" raises
`BadSampleError` at the first bad record instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from llava_smoe.config import Config, invalid
from llava_smoe.data.records import (
    BadSampleError,
    BadSamplePolicy,
    RecordInfo,
    SkipStats,
    check_record,
    load_records,
)
from llava_smoe.processing.images import load_image
from llava_smoe.processing.processor import LlavaSmoeProcessor
from llava_smoe.processing.templates import Message, normalize_messages

logger = logging.getLogger(__name__)
LOGGED_PER_REASON = 10


@dataclass
class DataConfig(Config):
    """One dataset: a LLaVA JSON/JSONL file, the folder its image paths are relative to, the
    longest sample allowed (in tokens, image tokens included) and what to do with bad samples.

    cache: keep each built sample (token ids, labels, preprocessed image; an image once however
    many records share it) in memory after its first use, so later epochs skip decoding and
    tokenising. For data that fits in RAM (the shapes world: ~100 MB a dataset); each DataLoader
    worker keeps its own cache for as long as it lives."""

    data_path: str
    image_folder: str | None = None
    max_length: int = 2048
    on_bad_sample: BadSamplePolicy = "error"
    cache: bool = False

    def validate(self) -> None:
        if self.max_length <= 0:
            raise invalid("max_length", f"must be a positive int, got {self.max_length!r}")


@dataclass(frozen=True)
class SkippedSample:
    """Returned by `LlavaDataset.__getitem__` under policy 'skip' in place of a bad sample."""

    reason: str
    index: int
    record_id: Any


class LlavaDataset(Dataset):
    """Samples {"input_ids", "labels", "image" (Tensor[3,S,S] or None)}.

    Records are kept as read (a JSONL file only as line offsets); tokenisation and image
    decoding happen per item. `lengths` / `has_image` (one entry per valid sample) feed
    `ModalityLengthGroupedSampler`; lengths are estimates (words + image tokens)."""

    def __init__(self, config: DataConfig, processor: LlavaSmoeProcessor):
        self.config = config
        self.processor = processor
        self.records = load_records(config.data_path)
        self.skip_stats = SkipStats()
        self._logged: Counter[str] = Counter()
        self._index: list[int] = []  # dataset position -> record index
        self._image_paths: list[str | None] = []  # dataset position -> checked image file
        self._samples: dict[int, dict[str, Any]] = {}  # record index -> built sample (config.cache)
        self._images: dict[str, Any] = {}  # image path -> preprocessed image (config.cache)
        self.lengths: list[int] = []
        self.has_image: list[bool] = []
        for i in range(len(self.records)):
            try:
                info = self._check(i)
            except BadSampleError as e:
                self.skip_stats.add(self._handle(e).reason)
                continue
            self._index.append(i)
            self._image_paths.append(info.image_path)
            self.has_image.append(info.has_image)
            words = sum(len(m.content.split()) for m in info.messages)
            self.lengths.append(words + (processor.num_image_tokens if info.has_image else 0))
        if self.skip_stats.total:
            logger.warning(
                "%s: skipped %d of %d records while indexing: %s",
                config.data_path, self.skip_stats.total, len(self.records), self.skip_stats.as_dict(),
            )

    def _check(self, record_index: int) -> RecordInfo:
        """The one validation of a record (at construction); subclasses add their own demands."""
        return check_record(
            self.records[record_index],
            record_index,
            source=self.config.data_path,
            image_folder=self.config.image_folder,
            image_token=self.processor.image_token,
        )

    def _messages(self, record_index: int) -> list[Message]:
        """A checked record's turns (only converted, not checked again)."""
        return normalize_messages(self.records[record_index]["conversations"])

    def _handle(self, error: BadSampleError) -> SkippedSample:
        if self.config.on_bad_sample == "error":
            raise error
        # Name the first few of each reason; after that the counts tell the story.
        self._logged[error.reason] += 1
        level = logging.WARNING if self._logged[error.reason] <= LOGGED_PER_REASON else logging.DEBUG
        logger.log(level, "skipping sample: %s", error)
        return SkippedSample(error.reason, error.index, error.record_id)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Any] | SkippedSample:
        record_index = self._index[i]
        if record_index in self._samples:
            return self._samples[record_index]
        try:
            sample = self._build(i)
        except BadSampleError as e:
            return self._handle(e)  # never cached: a bad sample is counted at every use
        if self.config.cache:
            self._samples[record_index] = sample
        return sample

    def record_index(self, i: int) -> int:
        """The record (its position in the file) that sample `i` comes from."""
        return self._index[i]

    def _bad(self, i: int, reason: str, detail: str) -> BadSampleError:
        record_index = self._index[i]
        record = self.records[record_index]
        return BadSampleError(reason, detail, source=self.config.data_path, index=record_index,
                              record_id=record.get("id") if isinstance(record, dict) else None)

    def _build(self, i: int) -> dict[str, Any]:
        record_index = self._index[i]
        image_path = self._image_paths[i]
        encoded = self.processor.encode_messages(self._messages(record_index), int(image_path is not None))
        length = encoded["input_ids"].numel()
        if length > self.config.max_length:
            raise self._bad(i, "too_long", f"sample is {length} tokens, longer than max_length={self.config.max_length}")
        return {"input_ids": encoded["input_ids"], "labels": encoded["labels"], "image": self._image(i)}

    def _image(self, i: int):
        """Sample i's preprocessed image [3, S, S], or None for a text-only record."""
        path = self._image_paths[i]
        if path is None:
            return None
        if path in self._images:
            return self._images[path]
        try:
            pil = load_image(path)
        except Exception as e:  # PIL raises several unrelated types for bad files
            raise self._bad(i, "unreadable_image", f"cannot decode image {path}: {e}") from e
        image = self.processor.preprocess_images([pil])[0]
        if self.config.cache:
            self._images[path] = image
        return image

    def validate(self) -> SkipStats:
        """Build every sample once (decode images, tokenise, check lengths) and return the counts
        of bad ones by reason (indexing-time skips included); raises at the first under policy
        'error'. A pre-flight check."""
        stats = self.skip_stats.copy()
        for i in range(len(self)):
            sample = self[i]
            if isinstance(sample, SkippedSample):
                stats.add(sample.reason)
        return stats
