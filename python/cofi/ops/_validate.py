"""Input checks shared by the public ops: every error names the argument, expected and actual."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ._autocast import casts_together

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: torch.device | None = None,
    like: torch.Tensor | None = None,
    like_name: str = "",
) -> torch.Tensor:
    """Validate one tensor argument; ``None`` entries of ``shape`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"cofi.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"cofi.ops.{op}: {name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        exp = tuple(shape)
        if t.dim() != len(exp) or any(e is not None and e != a for e, a in zip(exp, t.shape)):
            shown = tuple("*" if e is None else e for e in exp)
            raise ValueError(f"cofi.ops.{op}: {name} must have shape {shown}, got {tuple(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        raise TypeError(f"cofi.ops.{op}: {name} dtype must be one of {[_dt(d) for d in dtypes]}, got {_dt(t.dtype)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"cofi.ops.{op}: {name} is on {t.device} but {like_name} is on {like.device}")
        if t.dtype != like.dtype and t.dtype in FLOAT_DTYPES and dtypes is FLOAT_DTYPES and \
                not casts_together(t, like):  # under autocast the op's policy casts both to one dtype
            raise TypeError(f"cofi.ops.{op}: {name} dtype {_dt(t.dtype)} does not match {like_name} dtype {_dt(like.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"cofi.ops.{op}: {name} must be on {device}, got {t.device}")
    return t


def has_data(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: not under torch.compile, not a meta or fake tensor."""
    return not (torch.compiler.is_compiling() or t.device.type == "meta" or isinstance(t, FakeTensor))


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Reject NaN/inf (one host sync; used only where a NaN would silently corrupt state).

    Skipped where there is no data to read (see ``has_data``).
    """
    if t.numel() == 0 or not has_data(t):
        return
    # One reduction: a finite sum proves every element finite; only if it is not (NaN/inf, or a
    # sum that overflowed) do the exact elementwise check.
    if not math.isfinite(float(t.detach().sum())) and not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"cofi.ops.{op}: {name} contains NaN or inf")


def check_float(op: str, name: str, value: float, lo: float | None = None, hi: float | None = None, *,
                open_lo: bool = False, open_hi: bool = False, finite: bool = True) -> float:
    """``value`` as a float: a real number (not bool), not NaN, finite unless ``finite=False``,
    within [lo, hi] (``open_lo`` / ``open_hi`` exclude the bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"cofi.ops.{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if v != v:
        raise ValueError(f"cofi.ops.{op}: {name} must be a number, got NaN")
    if finite and math.isinf(v):
        raise ValueError(f"cofi.ops.{op}: {name} must be finite, got {v}")
    if lo is not None and (v < lo or (open_lo and v == lo)):
        raise ValueError(f"cofi.ops.{op}: {name} must be {'>' if open_lo else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (open_hi and v == hi)):
        raise ValueError(f"cofi.ops.{op}: {name} must be {'<' if open_hi else '<='} {hi}, got {v}")
    return v


def check_int(op: str, name: str, value: object, lo: int | None = None) -> int:
    """``value`` as an int: an integer type (int, numpy integer; not bool, not float), >= ``lo``.

    Floats are refused even when integral: an integer-valued argument passed as a float is
    usually a computed size that was silently truncated elsewhere.
    """
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"cofi.ops.{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"cofi.ops.{op}: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if lo is not None and v < lo:
        raise ValueError(f"cofi.ops.{op}: {name} must be >= {lo}, got {v}")
    return v
