"""The CLI's allocator setting: large buffers come from the heap (not fresh mappings) unless
the user says otherwise. Each case runs in its own process, since the setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llava_smoe import allocator

pytestmark = pytest.mark.skipif(allocator._libc() is None, reason="needs glibc's mallopt (Linux)")

# Allocate a 64 MiB tensor (above glibc's largest mmap threshold) and report how many bytes
# glibc holds in mappings while it is alive.
PROBE = """
import ctypes, sys
from llava_smoe import allocator
mode = allocator.configure()
import torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
x = torch.ones(64 << 20, dtype=torch.uint8)
info = libc.mallinfo2()
print(mode, info.hblkhd, info.arena)
"""


def _probe(**env_extra: str) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items()
           if k != "GLIBC_TUNABLES" and not (k.startswith("MALLOC_") and k.endswith("_"))}
    env.pop(allocator.ENV, None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    mode, mapped, heap = out.stdout.split()
    return mode, int(mapped), int(heap)


def test_keep_takes_large_buffers_from_the_heap():
    mode, mapped, heap = _probe()
    assert mode == "keep"
    assert mapped < 64 << 20 <= heap


def test_system_leaves_glibc_mapping_them():
    mode, mapped, _ = _probe(**{allocator.ENV: "system"})
    assert mode == "system"
    assert mapped >= 64 << 20


def test_glibc_settings_of_the_user_win():
    mode, mapped, _ = _probe(MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert mode == "system"
    assert mapped >= 64 << 20


def test_bad_value_is_one_line_at_the_command_line():
    env = dict(os.environ, **{allocator.ENV: "fast"})
    out = subprocess.run([sys.executable, "-m", "llava_smoe.cli", "bench", "moe", "--out", "unused.json"], env=env,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: LLAVA_SMOE_MALLOC='fast': expected one of ['keep', 'system']"
