"""Length-grouped sampling by modality: batches are drawn from image-only or text-only samples
of similar length (less padding, and no batch pays for an image tower pass it barely uses),
shuffled deterministically from a seed, and resumable from a position."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields dataset indices so that each consecutive run of `batch_size` (per replica) comes from
    one modality and a similar length.

    Per epoch: each modality's indices are shuffled, cut into mega-batches of
    `batch_size * num_replicas * mega_batch_mult`, each sorted by length (longest first) and cut
    into global batches; the global batches of both modalities are then shuffled together. A
    modality's leftover partial batch is kept (the only place modalities may mix is the single
    final batch built from both leftovers). With several replicas, each global batch is split
    into per-replica slices; the index list is padded by wrap-around so every replica gets the
    same number of samples. `set_epoch` changes the shuffle; `set_position(epoch, consumed)`
    resumes after `consumed` samples of this replica.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        batch_size: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        mega_batch_mult: int = 50,
    ):
        if len(lengths) != len(has_image):
            raise ValueError(f"lengths ({len(lengths)}) and has_image ({len(has_image)}) differ in length")
        if batch_size <= 0 or num_replicas <= 0 or not 0 <= rank < num_replicas or mega_batch_mult <= 0:
            raise ValueError(
                f"need batch_size > 0, num_replicas > 0, 0 <= rank < num_replicas, mega_batch_mult > 0; got "
                f"batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}, mega_batch_mult={mega_batch_mult}"
            )
        self.lengths = list(lengths)
        self.has_image = list(has_image)
        self.batch_size, self.seed = batch_size, seed
        self.num_replicas, self.rank, self.mega_batch_mult = num_replicas, rank, mega_batch_mult
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def set_position(self, epoch: int, consumed: int) -> None:
        """Resume: the next iteration yields this replica's indices of `epoch` after `consumed`."""
        if not 0 <= consumed <= len(self):
            raise ValueError(f"consumed={consumed} is outside [0, {len(self)}] for this replica")
        self.epoch, self.start = epoch, consumed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.set_position(state["epoch"], state["start"])

    def _global_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        global_batch = self.batch_size * self.num_replicas
        mega = global_batch * self.mega_batch_mult
        batches: list[list[int]] = []
        leftovers: list[int] = []
        for modality in (True, False):
            idx = [i for i, h in enumerate(self.has_image) if h == modality]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            ordered: list[int] = []
            for m in range(0, len(idx), mega):
                ordered += sorted(idx[m : m + mega], key=lambda i: -self.lengths[i])
            full = len(ordered) - len(ordered) % global_batch
            batches += [ordered[b : b + global_batch] for b in range(0, full, global_batch)]
            leftovers += ordered[full:]
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[k] for k in order]
        if leftovers:
            batches.append(leftovers)
        return batches

    def _replica_indices(self) -> list[int]:
        flat = [i for b in self._global_batches() for i in b]
        if not flat:
            return []
        total = len(self) * self.num_replicas
        flat += (flat * (total // len(flat) + 1))[: total - len(flat)]  # wrap-around padding
        per_batch = self.batch_size
        out: list[int] = []
        for b in range(0, total, per_batch * self.num_replicas):
            chunk = flat[b : b + per_batch * self.num_replicas]
            share = -(-len(chunk) // self.num_replicas)
            out += chunk[self.rank * share : (self.rank + 1) * share]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self._replica_indices()[self.start :])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.num_replicas)
