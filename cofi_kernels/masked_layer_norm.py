"""Triton kernels of cofi.ops.masked_layer_norm: one fused pass per row.

``_masked_layer_norm_fwd_kernel``: v = x z + r, kept-dim mean / variance (corrected two-pass, as the
reference's ``row_stats``), affine, times z; stores y, mean, rstd. ``_masked_layer_norm_bwd_kernel``:
ROWS rows per program; dx, d residual per row and this program's partial column sums of (d weight,
d bias, d hidden_z), summed afterwards.
Runs compiled on CUDA and under TRITON_INTERPRET=1 on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import LAYER_NORM_ROWS, device_guard, layer_norm_num_warps

ROWS = LAYER_NORM_ROWS


@triton.jit
def _masked_layer_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, z_ptr, y_ptr, mean_ptr, rstd_ptr, D, eps,
                                  HAS_R: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * D exceeds 2**31 past 2**31 elements
    offs = tl.arange(0, BLOCK_D)
    md = offs < D
    v = tl.load(x_ptr + row * D + offs, mask=md, other=0.0).to(tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=md, other=0.0).to(v.dtype)
        v = v * z
        k = tl.where(z != 0, 1.0, 0.0).to(v.dtype)
    else:
        k = tl.where(md, 1.0, 0.0).to(v.dtype)
    if HAS_R:
        v += tl.load(r_ptr + row * D + offs, mask=md, other=0.0).to(v.dtype)
    n = tl.maximum(tl.sum(k, axis=0), 1.0)
    # Corrected two-pass statistics (reference row_stats): the residuals c of the first mean correct
    # mean and variance, so a row constant over its kept dims normalises to exactly 0.
    mean0 = tl.sum(v * k, axis=0) / n
    c = (v - mean0) * k
    s1 = tl.sum(c, axis=0)
    corr = s1 / n
    mean = mean0 + corr
    var = (tl.sum(c * c, axis=0) - s1 * corr) / n
    var = tl.where(var < 0.0, 0.0, var)  # clamp_min(0), NaN kept
    cen = (v - mean) * k
    rstd = 1.0 / tl.sqrt(var + eps)
    y = cen * rstd * tl.load(w_ptr + offs, mask=md, other=0.0).to(v.dtype) + tl.load(b_ptr + offs, mask=md, other=0.0).to(v.dtype)
    if HAS_Z:
        y = y * z
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=md)
    tl.store(mean_ptr + row, mean.to(mean_ptr.dtype.element_ty))
    tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))


@triton.jit
def _masked_layer_norm_bwd_kernel(g_ptr, x_ptr, r_ptr, w_ptr, b_ptr, z_ptr, mean_ptr, rstd_ptr, dx_ptr, dr_ptr,
                                  cols_ptr, N, D, HAS_R: tl.constexpr, HAS_Z: tl.constexpr, WANT_DX: tl.constexpr,
                                  WANT_DR: tl.constexpr, ROWS_PER: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    md = offs < D
    CT = tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64
    w = tl.load(w_ptr + offs, mask=md, other=0.0).to(CT)
    b = tl.load(b_ptr + offs, mask=md, other=0.0).to(CT)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=md, other=0.0).to(CT)
        k = tl.where(z != 0, 1.0, 0.0).to(CT)
    else:
        z = tl.where(md, 1.0, 0.0).to(CT)
        k = z
    n = tl.maximum(tl.sum(k, axis=0), 1.0)
    dw = tl.zeros((BLOCK_D,), dtype=CT)
    db = tl.zeros((BLOCK_D,), dtype=CT)
    dz = tl.zeros((BLOCK_D,), dtype=CT)
    for i in range(ROWS_PER):
        row = pid * ROWS_PER + i
        if row < N:
            x = tl.load(x_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            v = x * z if HAS_Z else x
            if HAS_R:
                v += tl.load(r_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            mean = tl.load(mean_ptr + row).to(CT)
            rstd = tl.load(rstd_ptr + row).to(CT)
            xhat = (v - mean) * k * rstd
            g = tl.load(g_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            go = g * z
            dxhat = go * w
            c1 = tl.sum(dxhat * k, axis=0) / n
            c2 = tl.sum(dxhat * xhat, axis=0) / n
            dv = (dxhat - c1 - xhat * c2) * rstd * k
            if WANT_DX:
                tl.store(dx_ptr + row * D + offs, (dv * z).to(dx_ptr.dtype.element_ty), mask=md)
            if WANT_DR:
                tl.store(dr_ptr + row * D + offs, dv.to(dr_ptr.dtype.element_ty), mask=md)
            dw += go * xhat
            db += go
            dz += g * (xhat * w + b) + dv * x
    base = cols_ptr + pid * 3 * D
    tl.store(base + offs, dw.to(cols_ptr.dtype.element_ty), mask=md)
    tl.store(base + D + offs, db.to(cols_ptr.dtype.element_ty), mask=md)
    tl.store(base + 2 * D + offs, dz.to(cols_ptr.dtype.element_ty), mask=md)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_layer_norm_fwd_triton(x, residual, weight, bias, hidden_z, eps: float):
    """x: [N, d] contiguous -> (y [N, d], mean [N], rstd [N])."""
    N, D = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
    rstd = torch.empty_like(mean)
    if N > 0:
        bd = triton.next_power_of_2(D)
        with device_guard(x):
            _masked_layer_norm_fwd_kernel[(N,)](x, residual if residual is not None else x, weight, bias,
                                                hidden_z if hidden_z is not None else weight, y, mean, rstd, D, eps,
                                                HAS_R=residual is not None, HAS_Z=hidden_z is not None,
                                                BLOCK_D=bd, num_warps=layer_norm_num_warps(bd, x.dtype))
    return y, mean, rstd


def masked_layer_norm_bwd_triton(grad, x, residual, weight, bias, hidden_z, mean, rstd, eps: float, needs):
    """Returns [dx, d residual, d weight, d bias, d hidden_z] (empty where not needed)."""
    N, D = x.shape
    want_dx, want_dr = bool(needs[0]), bool(needs[1]) and residual is not None
    dx = torch.empty_like(x) if want_dx else x.new_empty(0)
    dr = torch.empty_like(x) if want_dr else x.new_empty(0)
    progs = triton.cdiv(N, ROWS)
    cols = torch.zeros(max(progs, 1), 3, D, dtype=_stat_dtype(x), device=x.device)
    if N > 0:
        bd = triton.next_power_of_2(D)
        with device_guard(x):
            _masked_layer_norm_bwd_kernel[(progs,)](grad, x, residual if residual is not None else x, weight, bias,
                                                    hidden_z if hidden_z is not None else weight, mean, rstd,
                                                    dx if want_dx else x, dr if want_dr else x, cols, N, D,
                                                    HAS_R=residual is not None, HAS_Z=hidden_z is not None,
                                                    WANT_DX=want_dx, WANT_DR=want_dr, ROWS_PER=ROWS,
                                                    BLOCK_D=bd, num_warps=layer_norm_num_warps(bd, x.dtype))
    sums = cols.sum(0).to(x.dtype)
    e = lambda: x.new_empty(0)  # noqa: E731
    dw = sums[0].clone() if needs[2] else e()
    db = sums[1].clone() if needs[3] else e()
    dz = sums[2].clone() if (needs[4] and hidden_z is not None) else e()
    return [dx, dr, dw, db, dz]
