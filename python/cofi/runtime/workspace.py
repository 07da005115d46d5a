"""The CPU workspace of the compact runtime (``csrc/cpu_workspace.h``).

Inference on CPU allocates and frees the same large intermediates on every call; glibc returns
such blocks to the OS, so each call pays a page fault per fresh 4 KiB page (tens of ms per
batch-32 call here). Inside ``scope()`` (and inside every ``cofi::compact_encoder_fwd`` call) CPU
allocations of 64 KiB or more reuse blocks freed by earlier calls instead. The cache keeps at most
``COFI_WORKSPACE_MB`` (default 1024) MiB; ``release()`` frees it; ``COFI_WORKSPACE=0`` turns it off.
Results are unchanged: it only decides where tensors live.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch

from .. import _ext


class Stats(NamedTuple):
    cached_bytes: int
    in_use_bytes: int
    hits: int
    misses: int


def available() -> bool:
    """Whether this build of cofi._C has the workspace."""
    return _ext.native_loaded() and hasattr(torch.ops.cofi, "cpu_workspace_enter")


@contextlib.contextmanager
def scope(device: torch.device | str = "cpu") -> Iterator[None]:
    """Serve this thread's large CPU allocations from the workspace while inside (a no-op for
    other devices, without the native extension, and while torch.compile / export or the JIT
    tracer traces the body: allocation is not theirs to record)."""
    if (torch.device(device).type != "cpu" or not available() or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        yield
        return
    previous = torch.ops.cofi.cpu_workspace_enter()
    try:
        yield
    finally:
        torch.ops.cofi.cpu_workspace_exit(previous)


def stats() -> Stats:
    """Bytes cached (free for reuse), bytes handed out and still alive, reuse hits and misses."""
    if not available():
        return Stats(0, 0, 0, 0)
    return Stats(*torch.ops.cofi.cpu_workspace_stats())


def release() -> int:
    """Free every cached block; returns the bytes freed."""
    return int(torch.ops.cofi.cpu_workspace_release()) if available() else 0
