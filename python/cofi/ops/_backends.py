"""Backends as data: which implementations an op has, why one cannot run, and which one ran.

Backend names are fixed: ``native`` (the C++ extension ``cofi._C``: CPU kernels, and CUDA kernels in
a CUDA build), ``triton`` (GPU; interpreted on CPU under ``TRITON_INTERPRET=1``, only when forced),
``reference`` (eager PyTorch). The choice order for a call is: the ``backend=`` argument, then the
innermost ``use_backend(...)`` context, then ``COFI_BACKEND``, then ``auto``. The chosen string is
passed into the registered op, so a traced graph records it; ``auto`` resolves per input from the
PRIORITY table below. An explicit backend that cannot run raises with its reasons; ``auto`` with no
feasible backend raises with every backend's reasons. Nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .. import _ext

BACKENDS = ("native", "triton", "reference")
CHOICES = BACKENDS + ("auto",)

# Auto-selection order per device type. CPU: the native C++ kernels (measured faster than the eager
# reference for every op, benchmarks/results/cpu); interpreted Triton is never auto-selected.
# CUDA: native first until a lent GPU measures otherwise (benchmarks/README.md).
PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("native", "reference"),
    "cuda": ("native", "triton", "reference"),
}
# Per-op overrides of PRIORITY, {op: {device_type: order}}; set from benchmark results only.
OP_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {}


class BackendError(RuntimeError):
    """A requested backend cannot run these inputs (the message lists the reasons)."""


ReasonsFn = Callable[..., list[str]]


@dataclass
class BackendImpl:
    """One backend of one op.

    ``reasons(*inputs)`` lists why this backend cannot run the given call (empty = it can); it
    must not read tensor data (it runs before every kernel).
    """

    name: str
    reasons: ReasonsFn
    fwd: Callable[..., object]
    bwd: Callable[..., object] | None = None


@dataclass
class OpRecord:
    name: str
    impls: dict[str, BackendImpl] = field(default_factory=dict)


_REGISTRY: dict[str, OpRecord] = {}
# use_backend() stack. A plain list (not a ContextVar) so torch.compile can read it; the forcing
# is therefore process-wide, not per thread.
_forced: list[str] = []
_lock = threading.Lock()
_last: dict[str, str] = {}
_stats: Counter[tuple[str, str, str]] = Counter()


def register(op: str, impl: BackendImpl) -> None:
    """Register ``impl`` as backend ``impl.name`` of ``op``."""
    if impl.name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {impl.name!r}")
    _REGISTRY.setdefault(op, OpRecord(op)).impls[impl.name] = impl


def ops() -> list[str]:
    return sorted(_REGISTRY)


def impl(op: str, name: str) -> BackendImpl:
    return _REGISTRY[op].impls[name]


def _check_choice(name: str, where: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"cofi.ops: {where} must be one of {CHOICES}, got {name!r}")
    return name


def choice(explicit: str | None = None) -> str:
    """The backend string a call should carry: argument > context > COFI_BACKEND > 'auto'."""
    if explicit is not None:
        return _check_choice(explicit, "backend")
    if _forced:
        return _forced[-1]
    env = os.environ.get("COFI_BACKEND")
    if env:
        return _check_choice(env, "COFI_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every cofi op called inside the block to ``name`` (or ``'auto'``)."""
    _forced.append(_check_choice(name, "use_backend"))
    try:
        yield
    finally:
        _forced.pop()


# --- availability of whole backends (build / install level) -------------------------------------

def triton_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on ``device`` in this process (empty = it can)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return [f"triton not importable ({type(e).__name__}: {e})"]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        if interpret:
            return ["TRITON_INTERPRET=1 is set: Triton runs on CPU tensors only"]
        return []
    if device.type == "cpu":
        return [] if interpret else ["Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"]
    return [f"Triton does not support device {device.type!r}"]


def native_reasons(device: torch.device, native_op: str) -> list[str]:
    """Why the C++ extension cannot run ``cofi::<native_op>`` on ``device`` (empty = it can)."""
    if not _ext.native_loaded():
        return [f"extension not built: {_ext.native_error()}"]
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return [f"no native kernels for device {device.type!r}"]
    if not _ext.has_kernel(native_op, key):
        if key == "CUDA":
            return ["extension built without CUDA kernels (CPU torch, no CUDA_HOME, or COFI_CUDA=0)"]
        return [f"cofi::{native_op} has no {key} kernel"]
    return []


def dtype_reasons(arg: str, t: torch.Tensor, allowed: dict[str, tuple[torch.dtype, ...]]) -> list[str]:
    ok = allowed.get(t.device.type, ())
    if t.dtype not in ok:
        names = ", ".join(str(d).replace("torch.", "") for d in ok) or "none"
        return [f"{arg} dtype {str(t.dtype).replace('torch.', '')} not supported on {t.device.type} (supported: {names})"]
    return []


def first_input_reasons(
    native_op: str,
    arg: str,
    native_dtypes: dict[str, tuple[torch.dtype, ...]],
    triton_dtypes: dict[str, tuple[torch.dtype, ...]],
    ref_dtypes: dict[str, tuple[torch.dtype, ...]],
) -> tuple[ReasonsFn, ReasonsFn, ReasonsFn]:
    """(native, triton, reference) reason checks that look only at the call's first tensor
    (named ``arg`` in messages): build/device availability plus its dtype."""

    def native(x: torch.Tensor, *rest: object) -> list[str]:
        return native_reasons(x.device, native_op) + dtype_reasons(arg, x, native_dtypes)

    def triton(x: torch.Tensor, *rest: object) -> list[str]:
        return triton_reasons(x.device) + dtype_reasons(arg, x, triton_dtypes)

    def reference(x: torch.Tensor, *rest: object) -> list[str]:
        return dtype_reasons(arg, x, ref_dtypes)

    return native, triton, reference


# --- resolution and recording -------------------------------------------------------------------

def resolve(op: str, chosen: str, *inputs: object) -> BackendImpl:
    """Pick the implementation of ``op`` for this call; raise BackendError listing reasons."""
    rec = _REGISTRY[op]
    if chosen != "auto":
        impl_ = rec.impls.get(chosen)
        if impl_ is None:
            raise BackendError(f"cofi.ops.{op}: backend {chosen!r} is not implemented for this op")
        why = impl_.reasons(*inputs)
        if why:
            raise BackendError(f"cofi.ops.{op}: backend {chosen!r} cannot run this call: " + "; ".join(why))
        return impl_
    device = _first_device(inputs)
    order = OP_PRIORITY.get(op, {}).get(device.type, PRIORITY.get(device.type, ("reference",)))
    rejected = []
    for name in order:
        impl_ = rec.impls.get(name)
        if impl_ is None:
            rejected.append(f"{name}: not implemented")
            continue
        why = impl_.reasons(*inputs)
        if not why:
            return impl_
        rejected.append(f"{name}: " + "; ".join(why))
    raise BackendError(f"cofi.ops.{op}: no backend can run this call on {device.type}: " + " | ".join(rejected))


def _first_device(inputs: tuple[object, ...]) -> torch.device:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def record(op: str, name: str, device: torch.device) -> None:
    with _lock:
        _last[op] = name
        _stats[(op, name, device.type)] += 1


def last_backend(op: str) -> str | None:
    """The backend that ran the most recent call of ``op`` (forward or backward), or None."""
    return _last.get(op)


def backend_stats() -> dict[tuple[str, str, str], int]:
    """Call counts keyed by (op, backend, device type)."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        _last.clear()
        _stats.clear()


def run(op: str, chosen: str, phase: str, *args: object) -> object:
    """Resolve, record and run the ``phase`` ('fwd' or 'bwd') implementation of ``op``."""
    impl_ = resolve(op, chosen, *args)
    fn = impl_.fwd if phase == "fwd" else impl_.bwd
    if fn is None:
        raise BackendError(f"cofi.ops.{op}: backend {impl_.name!r} has no {phase} implementation")
    record(op, impl_.name, _first_device(args))
    return fn(*args)
