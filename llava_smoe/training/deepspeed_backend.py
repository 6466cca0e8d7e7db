"""DeepSpeed ZeRO-2 / ZeRO-3 back end (the only module that imports DeepSpeed).

On CPU, run under `torchrun` (gloo); DeepSpeed's own launcher hangs there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import set_z3_leaf_modules
from safetensors.torch import save_file
from torch import nn

from llava_smoe.config import ConfigError
from llava_smoe.moe import MoELayer, collect_aux_losses
from llava_smoe.training.backends import MODEL_FILE, call_model
from llava_smoe.training.config import TrainConfig
from llava_smoe.training.distributed import DistInfo

ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"


def fill_deepspeed_config(path: str | Path, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON and replace its "auto" values with this run's settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: {path} does not exist (see train/deepspeed/zero2.json)")
    with open(path) as f:
        config = json.load(f)
    bf16 = train.precision == "bf16"
    auto = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "bf16.enabled": bf16,
        "fp16.enabled": False,
    }
    # The run config owns these: a conflicting number in the JSON is a mistake, not a choice.
    for key, value in auto.items():
        node, *_ = _lookup(config, key)
        current = node.get(key.split(".")[-1]) if node is not None else None
        if current not in (None, "auto") and current != value:
            raise ConfigError(
                f"{path}: {key}={current!r} conflicts with the run config ({value!r}); set it to \"auto\""
            )
        _assign(config, key, value)
    leftover = [k for k, v in _flatten(config).items() if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: cannot fill \"auto\" for {leftover}; give numbers")
    if config.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported; use train.precision=bf16 or fp32")
    return config


def _lookup(config: dict, dotted: str) -> tuple[dict | None, str]:
    node: Any = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), parts[-1]


def _assign(config: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class DeepSpeedBackend:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, dist_info: DistInfo,
                 moe_layers: list[nn.Module]):
        self.module = model
        self._moe_layers = moe_layers
        self.train = train
        self.dist = dist_info
        config = fill_deepspeed_config(train.deepspeed_config, train, dist_info.world_size)
        self.stage = int(config.get("zero_optimization", {}).get("stage", 0))
        if self.stage == 3 and moe_layers:
            # Whole MoE blocks are gathered at once, so a rank whose tokens skip an expert
            # still joins that expert's all-gathers instead of hanging the others.
            set_z3_leaf_modules(model, [MoELayer])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def accumulation(self, is_boundary: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine knows the boundary from its micro-step count

    def forward(self, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        return call_model(self.engine, batch), collect_aux_losses(self._moe_layers)

    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer scaled it for the accumulation
        if not is_boundary:
            self.engine.step()  # bookkeeping only; the update happens at the boundary

    def grad_norm_before_step(self) -> None:
        return None  # the engine clips inside step()

    def step(self) -> torch.Tensor | float | None:
        self.engine.step()
        return self.engine.get_global_grad_norm()  # may live on the device: read at log time

    def skip_step(self) -> None:
        """Drop the reduced gradients the way the ZeRO optimizers do after an fp16 overflow."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        if hasattr(opt, "averaged_gradients"):
            opt.averaged_gradients = {}
        if hasattr(opt, "micro_step_id"):
            opt.micro_step_id = 0 if self.stage == 3 else -1  # start the next accumulation afresh
        # The boundary engine.step() was not called: advance its micro-step count as it would.
        self.engine.micro_steps += 1
        self.engine.skipped_steps += 1

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (empty elsewhere); collective under ZeRO-3."""
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        if not self.dist.is_main:
            return {}
        seen: set[tuple[int, int]] = set()
        out = {}
        for name, tensor in state.items():  # tied weights appear once, like save_model does
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            out[name] = tensor.detach().to("cpu").contiguous().clone()
        return out

    def save(self, ckpt_dir: Path) -> None:
        state = self._full_state_dict()  # for inspection and export; resume reads the engine files
        if self.dist.is_main:
            save_file(state, str(ckpt_dir / MODEL_FILE))
        self.engine.save_checkpoint(str(ckpt_dir / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(ckpt_dir / ENGINE_DIR), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed engine state under {ckpt_dir / ENGINE_DIR}")

    def export(self, export_fn: Callable[[nn.Module, Path], None], out_dir: Path) -> None:
        if self.stage == 3:
            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.dist.is_main:
                    with _own_storage(self.module):
                        export_fn(self.module, out_dir)
        elif self.dist.is_main:
            with _own_storage(self.module):
                export_fn(self.module, out_dir)


@contextlib.contextmanager
def _own_storage(module: nn.Module):
    """Give each parameter its own copy while exporting.

    DeepSpeed keeps parameters as views into flat buffers, which safetensors (and so
    save_pretrained) refuses as shared memory; ties between modules survive because a tied
    parameter is one object.
    """
    saved = [(p, p.data) for p in module.parameters()]
    for p, data in saved:
        p.data = data.clone()
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data
