"""Hidden-masked LayerNorm with fused residual add.

``masked_layer_norm(x, residual, weight, bias, hidden_z=None, eps=1e-12, backend=None)``:
v = x * hidden_z + residual; LayerNorm of v with mean and variance over the kept dims only
(hidden_z != 0), affine, then times hidden_z (pruned dims give 0). hidden_z=None is the plain
LayerNorm(x + residual) of the compact runtime; residual may be None. Registered as
``torch.ops.cofi.masked_layer_norm`` (+ ``masked_layer_norm_backward``) with fake and autograd
kernels; the kernels make one fused pass per row (statistics, normalise, affine, mask) and save
only the per-row mean and 1/std for backward.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import _backends as B
from ._autocast import policy_dtype
from ._validate import check_float, check_tensor
from .reference.masked_layer_norm import masked_layer_norm_ref, row_stats as _row_stats

OP = "masked_layer_norm"

_FLOATS = (torch.float32, torch.float64)
_GPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE_DTYPES = {"cpu": _FLOATS, "cuda": _GPU_FLOATS}
_TRITON_DTYPES = {"cpu": _FLOATS, "cuda": _GPU_FLOATS}
_REF_DTYPES = {"cpu": _GPU_FLOATS, "cuda": _GPU_FLOATS}


def _triton():
    import cofi_kernels.masked_layer_norm as k  # lazy: importing triton costs ~1 s

    return k


_native_reasons, _triton_reasons, _ref_reasons = B.first_input_reasons(
    "masked_layer_norm_fwd_native", "x", _NATIVE_DTYPES, _TRITON_DTYPES, _REF_DTYPES)


# ============================== reference backend =================================================

def _fwd_ref(x, residual, weight, bias, hidden_z, eps):
    """x, residual: [N, d] -> (y [N, d], mean [N], rstd [N]) in the compute dtype (fp32 for halves)."""
    cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    v = x.to(cdt) if hidden_z is None else x.to(cdt) * hidden_z.to(cdt)
    if residual is not None:
        v = v + residual.to(cdt)
    keep = v.new_ones(v.shape[-1]) if hidden_z is None else (hidden_z != 0).to(cdt)
    n = keep.sum().clamp_min(1)
    mean, var = _row_stats(v, keep, n)
    cen = (v - mean[:, None]) * keep
    rstd = torch.rsqrt(var + eps)
    y = cen * rstd[:, None] * weight.to(cdt) + bias.to(cdt)
    if hidden_z is not None:
        y = y * hidden_z.to(cdt)
    return y.to(x.dtype), mean, rstd


def _bwd_ref(grad, x, residual, weight, bias, hidden_z, mean, rstd, eps, needs):
    """Explicit formulas (custom-op bodies run below autograd, so no autograd.grad here)."""
    cdt = mean.dtype
    g, xc, w = grad.to(cdt), x.to(cdt), weight.to(cdt)
    z = None if hidden_z is None else hidden_z.to(cdt)
    v = xc if z is None else xc * z
    if residual is not None:
        v = v + residual.to(cdt)
    keep = torch.ones_like(w) if z is None else (z != 0).to(cdt)
    n = keep.sum().clamp_min(1)
    xhat = (v - mean[:, None]) * rstd[:, None] * keep
    go = g if z is None else g * z
    dxhat = go * w
    c1 = (dxhat * keep).sum(-1, keepdim=True) / n
    c2 = (dxhat * xhat).sum(-1, keepdim=True) / n
    dv = (dxhat - c1 - xhat * c2) * rstd[:, None] * keep
    dx = (dv.clone() if z is None else dv * z).to(x.dtype) if needs[0] else grad.new_empty(0)
    dr = dv.to(x.dtype) if needs[1] else grad.new_empty(0)
    dw = (go * xhat).sum(0).to(x.dtype) if needs[2] else grad.new_empty(0)
    db = go.sum(0).to(x.dtype) if needs[3] else grad.new_empty(0)
    dz = (g * (xhat * w + bias.to(cdt)) + dv * xc).sum(0).to(x.dtype) if needs[4] else grad.new_empty(0)
    return [dx, dr, dw, db, dz]


B.register(OP, B.BackendImpl("reference", _ref_reasons, _fwd_ref, _bwd_ref))
B.register(OP, B.BackendImpl(
    "native", _native_reasons,
    lambda *a: tuple(torch.ops.cofi.masked_layer_norm_fwd_native(*a)),
    lambda *a: list(torch.ops.cofi.masked_layer_norm_bwd_native(*a))))
B.register(OP, B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().masked_layer_norm_fwd_triton(*a),
    lambda *a: _triton().masked_layer_norm_bwd_triton(*a)))


# ============================== custom ops ========================================================

def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


@torch.library.custom_op("cofi::masked_layer_norm", mutates_args=())
def _ln_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
           hidden_z: torch.Tensor | None, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: [N, d] -> (y [N, d], mean [N], rstd [N]); mean/rstd are saved for backward."""
    y, mean, rstd = B.run(OP, backend, "fwd", x.contiguous(), _c(residual), weight.contiguous(), bias.contiguous(),
                          _c(hidden_z), eps)
    return y, mean, rstd


@_ln_op.register_fake
def _(x, residual, weight, bias, hidden_z, eps, backend):
    torch._check(x.dim() == 2 and weight.shape[0] == x.shape[1], lambda: "x must be [N, d]")
    sd = _stat_dtype(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=sd), \
        x.new_empty(x.shape[0], dtype=sd)


@torch.library.custom_op("cofi::masked_layer_norm_backward", mutates_args=())
def _ln_bwd_op(grad: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor, hidden_z: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
               eps: float, needs: list[bool], backend: str) -> list[torch.Tensor]:
    """Returns [dx, d residual, d weight, d bias, d hidden_z]; an empty tensor where not needed."""
    return list(B.run(OP, backend, "bwd", grad.contiguous(), x.contiguous(), _c(residual), weight.contiguous(),
                      bias.contiguous(), _c(hidden_z), mean.contiguous(), rstd.contiguous(), eps,
                      [bool(n) for n in needs]))


def _bwd_fake(grad, x, residual, weight, bias, hidden_z, mean, rstd, eps, needs, *rest):
    ins = (x, residual, weight, bias, hidden_z)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n) else grad.new_empty(0)
            for t, n in zip(ins, needs)]


_ln_bwd_op.register_fake(_bwd_fake)


def _ln_setup(ctx, inputs, output):
    x, residual, weight, bias, hidden_z, eps, backend = inputs
    ctx.save_for_backward(x, residual, weight, bias, hidden_z, output[1], output[2])
    ctx.args = (eps, backend)


def _ln_backward(ctx, grad, _gm, _gr):
    x, residual, weight, bias, hidden_z, mean, rstd = ctx.saved_tensors
    eps, backend = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    needs[1] = needs[1] and residual is not None
    needs[4] = needs[4] and hidden_z is not None
    if grad is None or not any(needs):
        return (None,) * 7
    grads = torch.ops.cofi.masked_layer_norm_backward(grad, x, residual, weight, bias, hidden_z, mean, rstd, eps,
                                                      needs, backend)
    return (*[g if n else None for g, n in zip(grads, needs)], None, None)


_ln_op.register_autograd(_ln_backward, setup_context=_ln_setup)


# ============================== public API ========================================================

def masked_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    hidden_z: torch.Tensor | None = None,
    eps: float = 1e-12,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(x * hidden_z + residual) over the kept dims (hidden_z != 0), affine, times hidden_z.

    x: [..., d]; residual: like x or None; weight, bias: [d]; hidden_z: [d] (any float dtype, cast
    to x's) or None. Returns [..., d]; differentiable w.r.t. x, residual, weight, bias, hidden_z
    (hidden_z's zero pattern is structure, not differentiated). A row with no kept dim gives 0.
    """
    op = OP
    check_tensor(op, "x", x, ndim=tuple(range(1, 9)))
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"cofi.ops.{op}: x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if residual is not None:
        check_tensor(op, "residual", residual, shape=tuple(x.shape), like=x, like_name="x")
    check_tensor(op, "weight", weight, shape=(d,), like=x, like_name="x")
    check_tensor(op, "bias", bias, shape=(d,), like=x, like_name="x")
    if hidden_z is not None:
        check_tensor(op, "hidden_z", hidden_z, shape=(d,), device=x.device)
        hidden_z = hidden_z.to(policy_dtype(OP, x))  # not rounded through x's dtype under autocast
    check_float(op, "eps", eps, 0.0)
    lead = x.shape[:-1]
    y, _, _ = torch.ops.cofi.masked_layer_norm(x.reshape(-1, d), residual.reshape(-1, d) if residual is not None else None,
                                               weight, bias, hidden_z, float(eps), B.choice(backend))
    return y.reshape(*lead, d)


# ============================== native fakes ======================================================

if _ext.native_loaded():
    try:
        @torch.library.register_fake("cofi::masked_layer_norm_fwd_native")
        def _(x, residual, weight, bias, hidden_z, eps):
            sd = _stat_dtype(x)
            return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[0], dtype=sd), \
                x.new_empty(x.shape[0], dtype=sd)

        torch.library.register_fake("cofi::masked_layer_norm_bwd_native")(_bwd_fake)
    except RuntimeError:  # pragma: no cover - extension built before this op existed
        pass


__all__ = ["masked_layer_norm", "masked_layer_norm_ref"]
