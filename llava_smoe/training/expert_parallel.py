"""Expert parallelism (`train.expert_parallel: N`) under the torch back end, composed with data
parallelism.

W processes form W / N expert-parallel groups of N consecutive ranks (an all-to-all is the
heaviest exchange, so it stays among neighbours, as within a node). Each rank of a group holds
E / N experts of every MoE layer and their optimizer state (`llava_smoe.moe.parallel`); the
ranks that hold the same experts (rank i of every group) form that shard's data-parallel group.

Gradients:
- Every other parameter is replicated on all W ranks and averaged by DDP over all of them.
- Expert parameters are left out of DDP: after the backward, the local gradient of an expert
  already sums what the tokens of the whole expert-parallel group contributed (the reverse
  all-to-all brought them), so it is summed over the shard's data-parallel group and divided
  by W, which is the average over all W ranks that DDP computes for the others.
- The gradient norm adds the replicated parameters' squares once and the expert shards' squares
  over the expert-parallel group, so every rank clips with the same, global norm.

Checkpoints hold the full weights (experts gathered, written by rank 0) and one optimizer state
per rank; an export gathers the experts first. EP with ZeRO is not implemented: DeepSpeed would
have to partition only within each shard's data-parallel group.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llava_smoe.config import ConfigError
from llava_smoe.moe import moe_layers
from llava_smoe.moe.parallel import (
    ExpertParallelExperts,
    gathered_experts,
    shard_experts,
)
from llava_smoe.training.distributed import DistInfo


@dataclass
class ExpertParallel:
    size: int
    world_size: int
    ep_group: object
    dp_group: object  # the ranks that hold this rank's experts
    expert_names: list[str]
    expert_params: list[nn.Parameter]

    @property
    def ep_rank(self) -> int:
        return dist.get_rank(self.ep_group)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.size

    @classmethod
    def setup(cls, model: nn.Module, size: int, dist_info: DistInfo) -> ExpertParallel:
        """Create the process groups (every rank creates every group, in one order) and shard `model`."""
        world = dist_info.world_size
        if world % size:
            raise ConfigError(f"train.expert_parallel={size} must divide the number of processes ({world})")
        if not moe_layers(model):
            raise ConfigError(f"train.expert_parallel={size}, but the model has no MoE layer")
        for name, layer in moe_layers(model):
            if layer.config.num_experts % size:
                raise ConfigError(f"train.expert_parallel={size} does not divide the {layer.config.num_experts} "
                                  f"experts of MoE layer {name}")
        ep_group = dp_group = None
        for start in range(0, world, size):
            group = dist.new_group(list(range(start, start + size)))
            if start <= dist_info.rank < start + size:
                ep_group = group
        for i in range(size):
            group = dist.new_group(list(range(i, world, size)))
            if dist_info.rank % size == i:
                dp_group = group
        names = shard_experts(model, ep_group)
        params = dict(model.named_parameters())
        return cls(size, world, ep_group, dp_group, names, [params[n] for n in names])

    def sync_grads(self) -> None:
        """Expert gradients: summed over the shard's data-parallel group, divided by W (see above)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.expert_params if p.requires_grad]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if self.dp_size > 1:
            dist.all_reduce(flat, group=self.dp_group)
        flat /= self.world_size
        offset = 0
        for p in (p for p in self.expert_params if p.requires_grad):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global gradient norm (replicated parameters once, expert shards over the group); clips to max_norm."""
        expert_ids = {id(p) for p in self.expert_params}
        shared = [p.grad for p in params if p.grad is not None and id(p) not in expert_ids]
        shards = [p.grad for p in params if p.grad is not None and id(p) in expert_ids]
        zero = torch.zeros((), dtype=torch.float32, device=params[0].device)
        shared_sq = torch.nn.utils.get_total_norm(shared).float() ** 2 if shared else zero
        shard_sq = torch.nn.utils.get_total_norm(shards).float() ** 2 if shards else zero.clone()
        dist.all_reduce(shard_sq, group=self.ep_group)
        total = (shared_sq + shard_sq).sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    @contextlib.contextmanager
    def full_experts(self, model: nn.Module, write_back: bool = False) -> Iterator[None]:
        """Every MoE layer holds all its experts inside the block (collective on every rank);
        with `write_back`, this rank's slice of what the block left in them is kept (loading)."""
        swapped = []
        for _, layer in moe_layers(model):
            if isinstance(layer.experts, ExpertParallelExperts):
                swapped.append((layer, layer.experts))
                layer.experts = gathered_experts(layer.experts)
        try:
            yield
        finally:
            for layer, shard in swapped:
                if write_back:
                    first, n = shard.first_expert, shard.num_local_experts
                    with torch.no_grad():
                        for p, full in zip(shard.parameters(), layer.experts.parameters()):
                            p.copy_(full[first:first + n])
                layer.experts = shard
