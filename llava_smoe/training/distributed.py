"""Process-group set-up from torchrun's environment (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(backend: str) -> DistInfo:
    """Join the process group torchrun describes; a lone process needs one only for DeepSpeed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    need_group = world_size > 1 or backend == "deepspeed"
    if need_group and not dist.is_initialized():
        if world_size == 1:  # DeepSpeed insists on a process group even for one process
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        pg_backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "deepspeed":
            import deepspeed

            # DeepSpeed's own launcher hangs on CPU; under torchrun, gloo works.
            deepspeed.init_distributed(dist_backend=pg_backend)
        else:
            dist.init_process_group(pg_backend)
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
