"""Back ends: how forward/backward/step and checkpoints happen. The loop is shared.

`TorchBackend` runs one process or DDP (torchrun); `DeepSpeedBackend` (ZeRO-2/3) lives in
`deepspeed_backend.py` so DeepSpeed is imported only when chosen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from llava_smoe.moe import collect_aux_losses
from llava_smoe.training.config import TrainConfig
from llava_smoe.training.distributed import DistInfo

if TYPE_CHECKING:
    from llava_smoe.training.expert_parallel import ExpertParallel

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RANK_OPTIMIZER_FILE = "optimizer-rank-{rank:05d}.pt"  # expert parallelism: each rank's own state


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


class ForwardWithAux(nn.Module):
    """The model's forward, returning `(output, aux losses)`. The aux losses have to come out of
    the forward that DDP wraps: on a CompeteSMoE competition step the router is reached only
    through its distillation loss, and DDP, looking for unused parameters from the outputs alone,
    would mark it unused and then fail when its gradient arrives."""

    def __init__(self, model: nn.Module, moe_layers: list[nn.Module]):
        super().__init__()
        self.model = model
        self._moe_layers = moe_layers  # a plain list: not registered twice

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        return self.model(*args, **kwargs), collect_aux_losses(self._moe_layers)


BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer")  # transformers' names for a transformer block


def compile_blocks(model: nn.Module, moe_layers: list[nn.Module]) -> None:
    """`torch.compile` each transformer block in place (regional compilation: one compiled graph
    per block class and grad mode, not a whole-model graph retraced at every graph break), with
    the MoE layers left eager: their routing syncs with the host to size its dispatch. In place,
    so parameter names, checkpoints and export are those of the eager model."""
    for layer in moe_layers:
        layer.forward = torch.compiler.disable(layer.forward)
    for block in [m for m in model.modules() if type(m).__name__.endswith(BLOCK_SUFFIXES)]:
        block.compile(dynamic=True)  # sequence lengths vary from batch to batch


class Backend(Protocol):
    module: nn.Module  # the bare model (no wrapper), for MoE hooks and export

    @property
    def param_groups(self) -> list[dict]: ...  # the schedule writes group["lr"] here

    def accumulation(self, is_boundary: bool) -> contextlib.AbstractContextManager: ...
    def forward(self, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]: ...  # output, aux losses
    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None: ...  # loss already scaled for accumulation
    def grad_norm_before_step(self) -> torch.Tensor | None: ...  # clips when the back end clips here
    def step(self) -> torch.Tensor | float | None: ...  # applies the update; the grad norm if known
    def skip_step(self) -> None: ...  # discards the accumulated gradients
    def save(self, ckpt_dir: Path) -> None: ...  # collective; writes weights + optimizer state
    def load(self, ckpt_dir: Path) -> None: ...
    def export(self, export_fn: Callable[[nn.Module, Path], None], out_dir: Path) -> None: ...


class TorchBackend:
    """Plain PyTorch: AdamW, bf16 autocast, DDP when several processes run; with
    `expert_parallel` (a model already sharded), the expert shards are left out of DDP and
    their gradients reduced by it (see `llava_smoe.training.expert_parallel`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, dist_info: DistInfo,
                 moe_layers: list[nn.Module], expert_parallel: ExpertParallel | None = None):
        self.module = model
        self.optimizer = optimizer
        self.train = train
        self.dist = dist_info
        self.expert_parallel = expert_parallel
        self.wrapped: nn.Module = ForwardWithAux(model, moe_layers)
        if dist_info.world_size > 1:
            if expert_parallel is not None:
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    self.wrapped, [f"model.{name}" for name in expert_parallel.expert_names])
            # Experts that receive no token on a rank produce no gradient: DDP must look for them.
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.wrapped,
                device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
                find_unused_parameters=bool(moe_layers),
            )
        if train.compile:
            compile_blocks(model, moe_layers)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def accumulation(self, is_boundary: bool) -> contextlib.AbstractContextManager:
        if is_boundary or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()  # all-reduce once per optimizer step, not per micro-batch

    def forward(self, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.train.precision == "bf16"):
            return call_model(self.wrapped, batch)

    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None:
        loss.backward()

    def grad_norm_before_step(self) -> torch.Tensor:
        max_norm = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        if self.expert_parallel is not None:
            self.expert_parallel.sync_grads()
            return self.expert_parallel.clip_grad_norm(self._params, max_norm)
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _full_experts(self, write_back: bool = False) -> contextlib.AbstractContextManager:
        ep = self.expert_parallel
        return contextlib.nullcontext() if ep is None else ep.full_experts(self.module, write_back)

    def _optimizer_file(self, ckpt_dir: Path) -> Path:
        if self.expert_parallel is None:
            return ckpt_dir / OPTIMIZER_FILE
        return ckpt_dir / RANK_OPTIMIZER_FILE.format(rank=self.dist.rank)

    def save(self, ckpt_dir: Path) -> None:
        with self._full_experts():
            if self.dist.is_main:  # DDP replicas are identical (expert shards gathered)
                save_model(self.module, str(ckpt_dir / MODEL_FILE))
        if self.dist.is_main or self.expert_parallel is not None:
            torch.save(self.optimizer.state_dict(), self._optimizer_file(ckpt_dir))

    def load(self, ckpt_dir: Path) -> None:
        with self._full_experts(write_back=True):
            load_model(self.module, str(ckpt_dir / MODEL_FILE), strict=True, device=str(self.dist.device))
        path = self._optimizer_file(ckpt_dir)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {ckpt_dir} was not written by an expert-parallel run "
                                    "of this size (train.expert_parallel and the number of processes must match)")
        self.optimizer.load_state_dict(torch.load(path, map_location=self.dist.device, weights_only=True))

    def export(self, export_fn: Callable[[nn.Module, Path], None], out_dir: Path) -> None:
        with self._full_experts():
            if self.dist.is_main:
                export_fn(self.module, out_dir)

