"""Large CPU buffers reused from step to step instead of mapped afresh (glibc's malloc).

glibc serves every request above its mmap threshold (at most 32 MiB) with a new anonymous
mapping and unmaps it on free, so a training step whose activations are that large (an MoE
layer's [E, T, 2F] expert buffers, logits over a vocabulary) page-faults all of them in again on
every step. Taking them from the heap and keeping freed memory there removes that: at the MoE
benchmark's sizes a forced CompeteSMoE competition step ran 16-20% faster on a 2-core VM, the
dense FFN and smoe's layer 10-13% (docs/benchmarks.md).
The cost is that the process keeps its peak heap until it exits, which is what a training or
serving process does anyway.

`llava-smoe` applies it to every command; `LLAVA_SMOE_MALLOC=system` (or glibc's own
`MALLOC_MMAP_MAX_` / `GLIBC_TUNABLES` malloc settings) leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

from llava_smoe.config import ConfigError

ENV = "LLAVA_SMOE_MALLOC"
MODES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: return free heap to the OS only beyond 2 GiB


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def _user_chose_malloc() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return "glibc.malloc." in tunables or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)


_mode = "system"


def configure() -> str:
    """Apply the setting to this process; return the mode in force: "keep" or "system"."""
    global _mode
    requested = os.environ.get(ENV, "keep")
    if requested not in MODES:
        raise ConfigError(f"{ENV}={requested!r}: expected one of {list(MODES)}")
    libc = _libc() if requested == "keep" and not _user_chose_malloc() else None
    if libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1:
        _mode = "keep"
    return _mode


def mode() -> str:
    """The mode `configure` put in force in this process (benchmarks report it)."""
    return _mode
