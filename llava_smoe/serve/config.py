"""Serving configs: the engine's command-line arguments and the HTTP server's limits.

Importable without torch so the CLI's argument parsing stays fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field

from llava_smoe.config import Config, invalid
from llava_smoe.inference.config import EngineConfig
from llava_smoe.pretrained import DTYPES

__all__ = ["EngineConfig", "ServerLimits", "add_engine_arguments", "bind_warning", "engine_config_from_args"]


@dataclass
class ServerLimits(Config):
    """What one HTTP request may ask for; anything over is refused with a 4xx, never truncated.

    max_concurrent_requests: requests in flight (streaming ones until their last chunk);
        one more gets 429.
    allow_remote_images: fetch http(s) image URLs (off: only data URLs are accepted); hosts
        resolving to loopback, private, link-local, multicast or reserved addresses are refused.
    allowed_image_hosts: host names whose private addresses may be fetched from all the same
        (an image server on the local network).
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
    allowed_image_hosts: list[str] = field(default_factory=list)
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
        self.allowed_image_hosts = [h.lower().rstrip(".") for h in self.allowed_image_hosts]
        if self.remote_image_timeout_s <= 0:
            raise invalid("remote_image_timeout_s", f"must be > 0, got {self.remote_image_timeout_s!r}")


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


def bind_warning(host: str, protected: bool, what: str, fix: str) -> str | None:
    """The warning for serving `what` on a non-loopback address without a login, or None."""
    if protected or _is_loopback(host):
        return None
    return (f"warning: binding {host} with no authentication: anyone who can reach this address can use {what}; "
            f"{fix}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
