"""``cofi.ops.backends()``: an op x backend x device table of what this install can run, and why not."""
from __future__ import annotations

import torch

from .. import _ext
from . import _backends as B

DEVICES = ("cpu", "cuda")


def _native(op: str, device: torch.device) -> list[str]:
    names = (f"{op}_fwd_native", f"{op}_native")
    if not _ext.native_loaded():
        return [f"extension not built: {_ext.native_error()}"]
    for n in names:
        if _ext.has_kernel(n, "CPU") or _ext.has_kernel(n, "CUDA"):
            return B.native_reasons(device, n)
    return ["no native kernel registered for this op"]


def _device_reasons(op: str, backend: str, device: str) -> list[str]:
    dev = torch.device(device)
    if backend in ("reference", "sdpa"):  # plain torch code: runs wherever torch runs
        return []
    if backend == "triton":
        why = B.triton_reasons(dev)
        if device == "cuda" and not why and not torch.cuda.is_available():
            why = ["no CUDA device visible to torch"]
        return why
    why = _native(op, dev)
    return why


def backends() -> dict[str, dict[str, dict[str, str | list[str]]]]:
    """{op: {backend: {device: "available" or [reasons]}}} for every registered op.

    "available" means the code for that device is present in this install (for CUDA: compiled in;
    a GPU is still needed to run it). Reasons are human-readable strings.
    """
    out: dict[str, dict[str, dict[str, str | list[str]]]] = {}
    for op in B.ops():
        row = out.setdefault(op, {})
        have = B.op_backends(op)
        for backend in B.BACKENDS:
            if backend not in have:
                row[backend] = {d: ["not implemented for this op"] for d in DEVICES}
                continue
            row[backend] = {d: (_device_reasons(op, backend, d) or "available") for d in DEVICES}
    return out
