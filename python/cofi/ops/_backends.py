"""Backends as data: which implementations an op has, why one cannot run, and which one ran.

Backend names are fixed: ``native`` (the C++ extension ``cofi._C``: CPU kernels, and CUDA kernels in
a CUDA build), ``triton`` (GPU; interpreted on CPU under ``TRITON_INTERPRET=1``, only when forced),
``sdpa`` (masked_attention only: torch's ``scaled_dot_product_attention`` on the live heads),
``reference`` (eager PyTorch). The choice order for a call is: the ``backend=`` argument, then the
innermost ``use_backend(...)`` context, then ``COFI_BACKEND``, then ``auto``. The chosen string is
passed into the registered op, so a traced graph records it; ``auto`` resolves per input from the
PRIORITY table below. An explicit backend that cannot run raises with its reasons; ``auto`` with no
feasible backend raises with every backend's reasons. Nothing falls back silently.

Composite backends (``sdpa``) are plain differentiable torch code that the public function runs
*instead of* the registered custom op (``torch.ops.cofi.<op>``), with autograd through torch's own
derivatives; ``composite(...)`` decides per call whether one runs. The custom op itself never runs
them: inside it ``auto`` skips them and naming one is an error.
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

BACKENDS = ("native", "triton", "sdpa", "reference")
CHOICES = BACKENDS + ("auto",)

# Auto-selection order per device type. CPU: the native C++ kernels (measured faster than the eager
# reference for every op, benchmarks/results/cpu); interpreted Triton is never auto-selected.
# CUDA: native first until a lent GPU measures otherwise (benchmarks/README.md).
PRIORITY: dict[str, tuple[str, ...]] = {
    "cpu": ("native", "reference"),
    "cuda": ("native", "triton", "reference"),
}
# Per-op overrides of PRIORITY, {op: {device_type: order}}. masked_attention on CUDA: SDPA (torch's
# flash / memory-efficient kernels) then the eager reference, the lowest-risk order until a lent GPU
# measures the hand kernels (native CUDA and Triton are opt-in until then; docs/backends.md).
OP_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {
    "masked_attention": {"cuda": ("sdpa", "reference")},
}


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
    composite: bool = False  # plain torch code run by the public function, outside the custom op


@dataclass
class OpRecord:
    name: str
    impls: dict[str, BackendImpl] = field(default_factory=dict)  # backends of the registered custom op
    composites: dict[str, BackendImpl] = field(default_factory=dict)  # backends that replace it

    def get(self, name: str) -> BackendImpl | None:
        return self.impls.get(name) or self.composites.get(name)


_REGISTRY: dict[str, OpRecord] = {}
# use_backend() stack. A plain list (not a ContextVar) so torch.compile can read it; the forcing
# is therefore process-wide, not per thread.
_forced: list[str] = []
_lock = threading.Lock()
_last: dict[str, str] = {}
_stats: Counter[tuple[str, str, str]] = Counter()


def register(op: str, impl: BackendImpl) -> None:
    """Register ``impl`` as backend ``impl.name`` of ``op`` (a composite one if ``impl.composite``)."""
    if impl.name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {impl.name!r}")
    rec = _REGISTRY.setdefault(op, OpRecord(op))
    (rec.composites if impl.composite else rec.impls)[impl.name] = impl


def ops() -> list[str]:
    return sorted(_REGISTRY)


def impl(op: str, name: str) -> BackendImpl:
    impl_ = _REGISTRY[op].get(name)
    if impl_ is None:
        raise KeyError(f"cofi.ops.{op} has no backend {name!r}")
    return impl_


def op_backends(op: str) -> tuple[str, ...]:
    """The backends ``op`` has (custom-op and composite), in BACKENDS order."""
    rec = _REGISTRY[op]
    return tuple(n for n in BACKENDS if rec.get(n) is not None)


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
            if _ext.build_info().get("cuda_compiled"):
                return [f"cofi::{native_op} has no CUDA kernel (on CUDA this op runs its triton or reference backend)"]
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

def priority(op: str, device_type: str) -> tuple[str, ...]:
    """The order ``auto`` tries the backends of ``op`` in on ``device_type``."""
    return OP_PRIORITY.get(op, {}).get(device_type, PRIORITY.get(device_type, ("reference",)))


def _explicit(op: str, chosen: str, inputs: tuple[object, ...]) -> BackendImpl:
    impl_ = _REGISTRY[op].get(chosen)
    if impl_ is None:
        raise BackendError(f"cofi.ops.{op}: backend {chosen!r} is not implemented for this op")
    why = impl_.reasons(*inputs)
    if why:
        raise BackendError(f"cofi.ops.{op}: backend {chosen!r} cannot run this call: " + "; ".join(why))
    return impl_


def resolve(op: str, chosen: str, *inputs: object, allow_composite: bool = False) -> BackendImpl:
    """Pick the implementation of ``op`` for this call; raise BackendError listing reasons.

    With ``allow_composite=False`` (inside the custom op) composite backends are never picked: ``auto``
    skips them and naming one raises.
    """
    rec = _REGISTRY[op]
    if chosen != "auto":
        impl_ = _explicit(op, chosen, inputs)
        if impl_.composite and not allow_composite:
            raise BackendError(f"cofi.ops.{op}: backend {chosen!r} is plain torch code run by cofi.ops.{op}, "
                               f"not a backend of torch.ops.cofi.{op}")
        return impl_
    device = _first_device(inputs)
    rejected = []
    for name in priority(op, device.type):
        impl_ = rec.get(name)
        if impl_ is None:
            rejected.append(f"{name}: not implemented")
            continue
        if impl_.composite and not allow_composite:
            rejected.append(f"{name}: runs only through cofi.ops.{op}, not inside torch.ops.cofi.{op}")
            continue
        why = impl_.reasons(*inputs)
        if not why:
            return impl_
        rejected.append(f"{name}: " + "; ".join(why))
    raise BackendError(f"cofi.ops.{op}: no backend can run this call on {device.type}: " + " | ".join(rejected))


def composite(op: str, chosen: str, *inputs: object) -> BackendImpl | None:
    """The composite backend the public function of ``op`` should run instead of its custom op, or
    None (then the custom op runs with ``chosen``, and resolves ``auto`` to the same backend this
    walk would have picked: the priority order minus the composites). Raises BackendError like
    ``resolve`` when nothing can run."""
    rec = _REGISTRY[op]
    if not rec.composites:
        return None
    if chosen != "auto":
        return _explicit(op, chosen, inputs) if chosen in rec.composites else None
    if not any(n in rec.composites for n in priority(op, _first_device(inputs).type)):
        return None
    impl_ = resolve(op, chosen, *inputs, allow_composite=True)
    return impl_ if impl_.composite else None


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
