"""How the engine runs: the checkpoint it loads and how it schedules requests.

Importable without torch, so command-line parsing stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from llava_smoe.config import Config, invalid
from llava_smoe.pretrained import DTypeChoice

DEVICES = ("auto", "cpu", "cuda")
Scheduling = Literal["continuous", "static"]


@dataclass
class EngineConfig(Config):
    """How a checkpoint is loaded and run.

    checkpoint: a folder written by save_pretrained (None when the engine is handed a model and
        processor already loaded, as evaluation does).
    device "auto" picks CUDA when available; dtype "auto" is bfloat16 on CUDA, float32 on CPU.
    max_batch_size: rows decoded together (1 serialises requests).
    max_context: prompt + new tokens allowed per request; None means the language model's
        max_position_embeddings (a smaller value is a hard cap, a larger one is refused).
    default_max_new_tokens: used when a request does not say (capped by the room left).
    num_threads: CPU threads for torch (None: torch's default); 1 is fastest for small models on
        a busy machine, where intra-op threads mostly wait on each other.
    scheduling: "continuous" (a request joins the running batch at the next decoding step) or
        "static" (requests wait until the running batch has finished: the baseline of
        `llava-smoe bench serve`).
    """

    checkpoint: str | None = None
    device: str = "auto"
    dtype: DTypeChoice = "auto"
    max_batch_size: int = 8
    max_context: int | None = None
    default_max_new_tokens: int = 256
    attn_implementation: str = "sdpa"
    num_threads: int | None = None
    scheduling: Scheduling = "continuous"

    def validate(self) -> None:
        if self.checkpoint is not None and not os.path.isdir(self.checkpoint):
            raise invalid("checkpoint", f"{self.checkpoint!r} is not a folder (expected a save_pretrained output)")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise invalid("device", f"must be one of {DEVICES} or 'cuda:N', got {self.device!r}")
        for name in ("max_batch_size", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise invalid(name, f"must be a positive int, got {getattr(self, name)!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise invalid("num_threads", f"must be a positive int or None, got {self.num_threads!r}")
        if self.max_context is not None and self.max_context < 2:
            raise invalid("max_context", f"must be an int >= 2 or None (the model's own), got {self.max_context!r}")
