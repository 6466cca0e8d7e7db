"""Back ends: how forward/backward/step and checkpoints happen. The loop is shared.

`TorchBackend` runs one process or DDP (torchrun); `DeepSpeedBackend` (ZeRO-2/3) lives in
`deepspeed_backend.py` so DeepSpeed is imported only when chosen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from llava_smoe.training.config import TrainConfig
from llava_smoe.training.distributed import DistInfo

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


class Backend(Protocol):
    module: nn.Module  # the bare model (no wrapper), for MoE hooks and export

    @property
    def param_groups(self) -> list[dict]: ...  # the schedule writes group["lr"] here

    def accumulation(self, is_boundary: bool) -> contextlib.AbstractContextManager: ...
    def forward(self, batch: Any) -> Any: ...
    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None: ...  # loss already scaled for accumulation
    def grad_norm_before_step(self) -> torch.Tensor | None: ...  # clips when the back end clips here
    def step(self) -> torch.Tensor | float | None: ...  # applies the update; the grad norm if known
    def skip_step(self) -> None: ...  # discards the accumulated gradients
    def save(self, ckpt_dir: Path) -> None: ...  # collective; writes weights + optimizer state
    def load(self, ckpt_dir: Path) -> None: ...
    def export(self, export_fn: Callable[[nn.Module, Path], None], out_dir: Path) -> None: ...


class TorchBackend:
    """Plain PyTorch: AdamW, bf16 autocast, DDP when several processes run."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, dist_info: DistInfo,
                 find_unused_parameters: bool):
        self.module = model
        self.optimizer = optimizer
        self.train = train
        self.dist = dist_info
        self.wrapped: nn.Module = model
        if dist_info.world_size > 1:
            # Experts that receive no token on a rank produce no gradient: DDP must look for them.
            self.wrapped = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters,
            )
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def accumulation(self, is_boundary: bool) -> contextlib.AbstractContextManager:
        if is_boundary or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()  # all-reduce once per optimizer step, not per micro-batch

    def forward(self, batch: Any) -> Any:
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.train.precision == "bf16"):
            return call_model(self.wrapped, batch)

    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None:
        loss.backward()

    def grad_norm_before_step(self) -> torch.Tensor:
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, ckpt_dir: Path) -> None:
        if self.dist.is_main:  # DDP replicas are identical
            save_model(self.module, str(ckpt_dir / MODEL_FILE))
            torch.save(self.optimizer.state_dict(), ckpt_dir / OPTIMIZER_FILE)

    def load(self, ckpt_dir: Path) -> None:
        load_model(self.module, str(ckpt_dir / MODEL_FILE), strict=True, device=str(self.dist.device))
        state = torch.load(ckpt_dir / OPTIMIZER_FILE, map_location=self.dist.device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def export(self, export_fn: Callable[[nn.Module, Path], None], out_dir: Path) -> None:
        if self.dist.is_main:
            export_fn(self.module, out_dir)

