"""Serving configs: the engine (model, device, batching) and the HTTP server's limits.

Configs validated at construction, importable without torch so the CLI's argument parsing
stays fast.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from llava_smoe.config import Config, invalid
from llava_smoe.pretrained import DTYPES, DTypeChoice

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig(Config):
    """How a checkpoint is loaded and run.

    device "auto" picks CUDA when available; dtype "auto" is bfloat16 on CUDA, float32 on CPU.
    max_batch_size: requests decoded together in one batch (1 serialises them).
    max_context: prompt + new tokens allowed per request; None means the language model's
        max_position_embeddings (a smaller value is a hard cap, a larger one is refused).
    default_max_new_tokens: used when a request does not say (capped by the room left).
    num_threads: CPU threads for torch (None: torch's default); 1 is fastest for small models on
        a busy machine, where intra-op threads mostly wait on each other.
    """

    checkpoint: str
    device: str = "auto"
    dtype: DTypeChoice = "auto"
    max_batch_size: int = 8
    max_context: int | None = None
    default_max_new_tokens: int = 256
    attn_implementation: str = "sdpa"
    num_threads: int | None = None

    def validate(self) -> None:
        if not os.path.isdir(self.checkpoint):
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


@dataclass
class ServerLimits(Config):
    """What one HTTP request may ask for; anything over is refused with a 4xx, never truncated.

    max_concurrent_requests: requests in flight (streaming ones until their last chunk);
        one more gets 429.
    allow_remote_images: fetch http(s) image URLs (off: only data URLs are accepted).
    file_url_roots: folders `file://` image URLs may point into (empty: file URLs refused).
    """

    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_tokens: int = 2048
    max_concurrent_requests: int = 16
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    file_url_roots: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_tokens", "max_concurrent_requests"):
            if getattr(self, name) < 1:
                raise invalid(name, f"limit must be a positive int, got {getattr(self, name)!r}")
        if self.max_images < 0:
            raise invalid("max_images", f"limit must be an int >= 0, got {self.max_images!r}")
        roots = []
        for root in self.file_url_roots:
            if not os.path.isdir(root):
                raise invalid("file_url_roots", f"file URL root {root!r} is not a folder")
            roots.append(os.path.realpath(root))
        self.file_url_roots = roots


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="folder written by save_pretrained (model + processor), safetensors weights")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default: 8)")
    parser.add_argument("--max-context", type=int, default=None,
                        help="prompt + new tokens per request (default: the model's max_position_embeddings)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="new tokens when a request does not say (default: 256)")
    parser.add_argument("--attn-implementation", default="sdpa", help="sdpa | eager | flash_attention_2 | auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_context=args.max_context,
        default_max_new_tokens=args.max_new_tokens,
        attn_implementation=args.attn_implementation,
        num_threads=args.threads,
    )
