"""Hidden-masked RMSNorm with optional fused residual add (the decoder analogue of masked_layer_norm).

``masked_rms_norm(x, residual, weight, hidden_z=None, eps=1e-6, backend=None)``: s = x * hidden_z +
residual; RMSNorm of s with the mean square over the kept dims only (hidden_z != 0), times weight,
then times hidden_z (pruned dims give 0). hidden_z=None is ``F.rms_norm(x + residual)``; residual may
be None; ``live=`` (kept-dim indices) may stand in for a 0/1 hidden_z. ``masked_add_rms_norm`` also
returns s, the next residual stream of a pre-norm decoder (Llama: h = h + sublayer(norm(h))).
Registered as ``torch.ops.cofi.masked_rms_norm`` (+ ``masked_rms_norm_backward``) with fake and
autograd kernels; the kernels make one fused pass per row and save only the per-row 1/rms.
Semantics and folding: docs/decoder.md.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import _backends as B
from ._autocast import policy_dtype
from ._validate import check_float, check_tensor, has_data
from .reference.masked_rms_norm import masked_add_rms_norm_ref, masked_rms_norm_ref

OP = "masked_rms_norm"

_FLOATS = (torch.float32, torch.float64)
_GPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE_DTYPES = {"cpu": _FLOATS}
_TRITON_DTYPES = {"cpu": _FLOATS, "cuda": _GPU_FLOATS}
_REF_DTYPES = {"cpu": _GPU_FLOATS, "cuda": _GPU_FLOATS}


def _triton():
    import cofi_kernels.masked_rms_norm as k  # lazy: importing triton costs ~1 s

    return k


_native_reasons, _triton_reasons, _ref_reasons = B.first_input_reasons(
    "masked_rms_norm_fwd_native", "x", _NATIVE_DTYPES, _TRITON_DTYPES, _REF_DTYPES)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# ============================== reference backend =================================================

def _sum_ref(x, residual, hidden_z, cdt):
    """s = x z + r in the compute dtype, rounded through x's dtype (the stored residual stream is
    what gets normalised, as in an unfused half-precision model)."""
    s = x.to(cdt) if hidden_z is None else x.to(cdt) * hidden_z.to(cdt)
    if residual is not None:
        s = s + residual.to(cdt)
    return s.to(x.dtype).to(cdt)


def _fwd_ref(x, residual, weight, hidden_z, eps, want_sum):
    """x, residual: [N, d] -> (y [N, d], s [N, d] or [0], rstd [N] in the compute dtype)."""
    cdt = _stat_dtype(x)
    s = _sum_ref(x, residual, hidden_z, cdt)
    keep = s.new_ones(s.shape[-1]) if hidden_z is None else (hidden_z != 0).to(cdt)
    n = keep.sum().clamp_min(1)
    rstd = torch.rsqrt((s * s * keep).sum(-1) / n + eps)
    y = s * keep * rstd[:, None] * weight.to(cdt)
    if hidden_z is not None:
        y = y * hidden_z.to(cdt)
    return y.to(x.dtype), (s.to(x.dtype, copy=True) if want_sum else x.new_empty(0)), rstd


def _bwd_ref(grad, grad_sum, x, residual, weight, hidden_z, rstd, needs):
    """Explicit formulas (custom-op bodies run below autograd, so no autograd.grad here)."""
    cdt = rstd.dtype
    g, xc, w = grad.to(cdt), x.to(cdt), weight.to(cdt)
    z = None if hidden_z is None else hidden_z.to(cdt)
    s = _sum_ref(x, residual, hidden_z, cdt)
    keep = torch.ones_like(w) if z is None else (z != 0).to(cdt)
    n = keep.sum().clamp_min(1)
    xhat = s * keep * rstd[:, None]
    go = g if z is None else g * z
    dxhat = go * w
    c2 = (dxhat * xhat).sum(-1, keepdim=True) / n
    ds = (dxhat - xhat * c2) * rstd[:, None] * keep
    if grad_sum is not None:
        ds = ds + grad_sum.to(cdt)
    dx = (ds.clone() if z is None else ds * z).to(x.dtype) if needs[0] else grad.new_empty(0)
    dr = ds.to(x.dtype) if needs[1] else grad.new_empty(0)
    dw = (go * xhat).sum(0).to(x.dtype) if needs[2] else grad.new_empty(0)
    dz = (g * xhat * w + ds * xc).sum(0).to(x.dtype) if needs[3] else grad.new_empty(0)
    return [dx, dr, dw, dz]


B.register(OP, B.BackendImpl("reference", _ref_reasons, _fwd_ref, _bwd_ref))
B.register(OP, B.BackendImpl(
    "native", _native_reasons,
    lambda *a: tuple(torch.ops.cofi.masked_rms_norm_fwd_native(*a)),
    lambda *a: list(torch.ops.cofi.masked_rms_norm_bwd_native(*a))))
B.register(OP, B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().masked_rms_norm_fwd_triton(*a),
    lambda *a: _triton().masked_rms_norm_bwd_triton(*a)))


# ============================== custom ops ========================================================

def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


@torch.library.custom_op("cofi::masked_rms_norm", mutates_args=())
def _rms_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, hidden_z: torch.Tensor | None,
            eps: float, want_sum: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: [N, d] -> (y [N, d], s [N, d] if want_sum else [0], rstd [N]); rstd is saved for backward."""
    y, s, rstd = B.run(OP, backend, "fwd", x.contiguous(), _c(residual), weight.contiguous(), _c(hidden_z), eps,
                       want_sum)
    return y, s, rstd


def _fwd_fake(x, residual, weight, hidden_z, eps, want_sum, *rest):
    torch._check(x.dim() == 2 and weight.shape[0] == x.shape[1], lambda: "x must be [N, d]")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if want_sum else x.new_empty(0)
    return y, s, x.new_empty(x.shape[0], dtype=_stat_dtype(x))


_rms_op.register_fake(_fwd_fake)


@torch.library.custom_op("cofi::masked_rms_norm_backward", mutates_args=())
def _rms_bwd_op(grad: torch.Tensor, grad_sum: torch.Tensor | None, x: torch.Tensor, residual: torch.Tensor | None,
                weight: torch.Tensor, hidden_z: torch.Tensor | None, rstd: torch.Tensor, needs: list[bool],
                backend: str) -> list[torch.Tensor]:
    """Returns [dx, d residual, d weight, d hidden_z]; an empty tensor where not needed."""
    return list(B.run(OP, backend, "bwd", grad.contiguous(), _c(grad_sum), x.contiguous(), _c(residual),
                      weight.contiguous(), _c(hidden_z), rstd.contiguous(), [bool(n) for n in needs]))


def _bwd_fake(grad, grad_sum, x, residual, weight, hidden_z, rstd, needs, *rest):
    ins = (x, residual, weight, hidden_z)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n) else grad.new_empty(0)
            for t, n in zip(ins, needs)]


_rms_bwd_op.register_fake(_bwd_fake)


def _rms_setup(ctx, inputs, output):
    x, residual, weight, hidden_z, eps, want_sum, backend = inputs
    ctx.save_for_backward(x, residual, weight, hidden_z, output[2])
    ctx.backend = backend


def _rms_backward(ctx, grad, grad_sum, _grstd):
    x, residual, weight, hidden_z, rstd = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    needs[1] = needs[1] and residual is not None
    needs[3] = needs[3] and hidden_z is not None
    if grad_sum is not None and grad_sum.numel() == 0:
        grad_sum = None
    if not any(needs) or (grad is None and grad_sum is None):
        return (None,) * 7
    if grad is None:
        grad = torch.zeros_like(x)
    grads = torch.ops.cofi.masked_rms_norm_backward(grad, grad_sum, x, residual, weight, hidden_z, rstd, needs,
                                                    ctx.backend)
    return (*[g if n else None for g, n in zip(grads, needs)], None, None, None)


_rms_op.register_autograd(_rms_backward, setup_context=_rms_setup)


# ============================== public API ========================================================

def _live_mask(live: torch.Tensor, d: int, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 hidden_z [d] in like's dtype from kept-dim indices live [k] (int64, unique, in [0, d))."""
    op = OP
    check_tensor(op, "live", live, ndim=1, dtypes=(torch.int64,), device=like.device)
    if live.numel() and has_data(live):
        lo, hi = int(live.min()), int(live.max())
        if lo < 0 or hi >= d:
            raise ValueError(f"cofi.ops.{op}: live must hold indices in [0, {d}), got values in [{lo}, {hi}]")
        if live.unique().numel() != live.numel():
            raise ValueError(f"cofi.ops.{op}: live must hold unique indices, got {live.numel()} with repeats")
    return like.new_zeros(d).index_fill_(0, live, 1.0)


def _call(x, residual, weight, hidden_z, eps, backend, live, want_sum):
    op = OP
    check_tensor(op, "x", x, ndim=tuple(range(1, 9)))
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"cofi.ops.{op}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor(op, "residual", residual, shape=tuple(x.shape), like=x, like_name="x")
    check_tensor(op, "weight", weight, shape=(d,), like=x, like_name="x")
    if live is not None:
        if hidden_z is not None:
            raise ValueError(f"cofi.ops.{op}: pass hidden_z or live, not both")
        hidden_z = _live_mask(live, d, x).to(policy_dtype(op, x))
    elif hidden_z is not None:
        check_tensor(op, "hidden_z", hidden_z, shape=(d,), device=x.device)
        hidden_z = hidden_z.to(policy_dtype(op, x))  # not rounded through x's dtype under autocast
    check_float(op, "eps", eps, 0.0)
    lead = x.shape[:-1]
    y, s, _ = torch.ops.cofi.masked_rms_norm(x.reshape(-1, d), residual.reshape(-1, d) if residual is not None else None,
                                             weight, hidden_z, float(eps), want_sum, B.choice(backend))
    return y.reshape(*lead, d), (s.reshape(*lead, d) if want_sum else None)


def masked_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    hidden_z: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
    *,
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm(x * hidden_z + residual) over the kept dims (hidden_z != 0), times weight and hidden_z.

    x: [..., d]; residual: like x or None; weight: [d]; hidden_z: [d] (any float dtype, cast to
    x's) or None; live: int64 [k] kept-dim indices, the same as a hidden_z of 1 there and 0 elsewhere.
    Returns [..., d]; differentiable w.r.t. x, residual, weight, hidden_z (hidden_z's zero pattern is
    structure, not differentiated). A row with no kept dim gives 0.
    """
    return _call(x, residual, weight, hidden_z, eps, backend, live, False)[0]


def masked_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    hidden_z: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
    *,
    live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s): ``masked_rms_norm``'s output y [..., d] and the sum s = x * hidden_z + residual
    [..., d] it normalised, the next residual stream of a pre-norm decoder; both differentiable."""
    y, s = _call(x, residual, weight, hidden_z, eps, backend, live, True)
    assert s is not None
    return y, s


# ============================== native fakes ======================================================

if _ext.native_loaded():
    try:
        torch.library.register_fake("cofi::masked_rms_norm_fwd_native")(_fwd_fake)
        torch.library.register_fake("cofi::masked_rms_norm_bwd_native")(_bwd_fake)
    except RuntimeError:  # pragma: no cover - extension built before this op existed
        pass


__all__ = ["masked_add_rms_norm", "masked_add_rms_norm_ref", "masked_rms_norm", "masked_rms_norm_ref"]
