"""Deterministic, resumable data order.

The order of epoch `e` is a permutation seeded by `(seed, e)`, identical on every rank; rank `r`
of `w` takes positions `r, r + w, ...` of it. A run's data position is `(epoch, index)`, the
index into this rank's order, so a resumed run reads exactly the samples it would have read.
`train.group_by_modality_length` swaps in `ModalityLengthGroupedSampler`, which keeps the same
`(epoch, index)` contract.

A micro-batch whose every sample a data policy dropped (`SkippedSample`) collates to an
`EmptyBatch` holding only the counts, so no task collator has to build zero-row tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from llava_smoe.data.dataset import SkippedSample


@dataclass(frozen=True)
class EmptyBatch:
    """A micro-batch with no sample left: {reason: count} of the samples dropped."""

    skipped: dict[str, int]


@dataclass(frozen=True)
class SkipAwareCollate:
    """The task's collate_fn, except on a micro-batch of skipped samples only (an EmptyBatch).
    A dataclass, so DataLoader workers can pickle it."""

    collate_fn: Callable[[list[Any]], Any]

    def __call__(self, samples: list[Any]) -> Any:
        if samples and all(isinstance(s, SkippedSample) for s in samples):
            return EmptyBatch(dict(Counter(s.reason for s in samples)))
        return self.collate_fn(samples)


class ResumableSampler(Sampler[int]):
    def __init__(self, dataset_len: int, *, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if dataset_len < world_size:
            raise ValueError(f"dataset has {dataset_len} samples, fewer than the {world_size} processes")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_index = 0

    def set_position(self, epoch: int, index: int) -> None:
        if not 0 <= index <= len(self):
            raise ValueError(f"sampler index {index} outside [0, {len(self)}]")
        self.epoch, self.start_index = epoch, index

    def order(self, epoch: int) -> list[int]:
        """This rank's sample indices for `epoch` (ranks get equal counts; the tail is dropped)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            full = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            full = list(range(self.dataset_len))
        usable = self.dataset_len - self.dataset_len % self.world_size
        return full[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start_index :])

    def __len__(self) -> int:
        return self.dataset_len // self.world_size


class ShardedEvalSampler(Sampler[int]):
    """Equal, in-order shards (ZeRO-3 ranks must run the same number of forwards).

    Up to `world_size - 1` trailing samples are left out so the shards stay equal.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1):
        usable = dataset_len - dataset_len % world_size
        self.indices = list(range(rank, usable, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def modality_lengths(dataset: Dataset) -> tuple[list[int], list[bool]] | None:
    """Each sample's (estimated length, has image), from a dataset that records them as `lengths`
    and `has_image` (`LlavaDataset`) or a `ConcatDataset` of such; None if it does not."""
    if isinstance(dataset, ConcatDataset):
        parts = [modality_lengths(d) for d in dataset.datasets]
        if any(p is None for p in parts):
            return None
        return [n for p in parts for n in p[0]], [h for p in parts for h in p[1]]
    lengths, has_image = getattr(dataset, "lengths", None), getattr(dataset, "has_image", None)
    if lengths is None or has_image is None:
        return None
    if not len(lengths) == len(has_image) == len(dataset):
        raise ValueError(f"{type(dataset).__name__} has {len(dataset)} samples but {len(lengths)} lengths "
                         f"and {len(has_image)} has_image flags")
    return list(lengths), list(has_image)
