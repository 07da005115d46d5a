"""Triton kernels of cofi.ops.masked_rms_norm: one fused pass per row.

``_masked_rms_norm_fwd_kernel``: s = x z + r (rounded through x's dtype, stored when wanted),
kept-dim mean square, y = s k rstd w z; stores y, s, rstd. ``_masked_rms_norm_bwd_kernel``: ROWS rows
per program; dx, d residual per row (plus the gradient of the stored s) and this program's partial
column sums of (d weight, d hidden_z), summed afterwards.
Runs compiled on CUDA and under TRITON_INTERPRET=1 on CPU tensors. Launch options are the layer
norm's (cofi_kernels/configs.py): the rows have the same shape and fewer live vectors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import LAYER_NORM_ROWS, device_guard, layer_norm_num_warps

ROWS = LAYER_NORM_ROWS


@triton.jit
def _masked_rms_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, z_ptr, y_ptr, s_ptr, rstd_ptr, D, eps,
                                HAS_R: tl.constexpr, HAS_Z: tl.constexpr, WANT_S: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * D exceeds 2**31 past 2**31 elements
    offs = tl.arange(0, BLOCK_D)
    md = offs < D
    CT = tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64
    s = tl.load(x_ptr + row * D + offs, mask=md, other=0.0).to(CT)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=md, other=0.0).to(CT)
        s = s * z
        k = tl.where(z != 0, 1.0, 0.0).to(CT)
    else:
        k = tl.where(md, 1.0, 0.0).to(CT)
    if HAS_R:
        s += tl.load(r_ptr + row * D + offs, mask=md, other=0.0).to(CT)
    s = s.to(x_ptr.dtype.element_ty).to(CT)  # the stored residual stream is what gets normalised
    if WANT_S:
        tl.store(s_ptr + row * D + offs, s.to(s_ptr.dtype.element_ty), mask=md)
    n = tl.maximum(tl.sum(k, axis=0), 1.0)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s * k, axis=0) / n + eps)
    y = s * k * rstd * tl.load(w_ptr + offs, mask=md, other=0.0).to(CT)
    if HAS_Z:
        y = y * z
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=md)
    tl.store(rstd_ptr + row, rstd.to(rstd_ptr.dtype.element_ty))


@triton.jit
def _masked_rms_norm_bwd_kernel(g_ptr, gs_ptr, x_ptr, r_ptr, w_ptr, z_ptr, rstd_ptr, dx_ptr, dr_ptr, cols_ptr, N, D,
                                HAS_GS: tl.constexpr, HAS_R: tl.constexpr, HAS_Z: tl.constexpr,
                                WANT_DX: tl.constexpr, WANT_DR: tl.constexpr, ROWS_PER: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    md = offs < D
    CT = tl.float32 if x_ptr.dtype.element_ty != tl.float64 else tl.float64
    w = tl.load(w_ptr + offs, mask=md, other=0.0).to(CT)
    if HAS_Z:
        z = tl.load(z_ptr + offs, mask=md, other=0.0).to(CT)
        k = tl.where(z != 0, 1.0, 0.0).to(CT)
    else:
        z = tl.where(md, 1.0, 0.0).to(CT)
        k = z
    n = tl.maximum(tl.sum(k, axis=0), 1.0)
    dw = tl.zeros((BLOCK_D,), dtype=CT)
    dz = tl.zeros((BLOCK_D,), dtype=CT)
    for i in range(ROWS_PER):
        row = pid * ROWS_PER + i
        if row < N:
            x = tl.load(x_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            s = x * z if HAS_Z else x
            if HAS_R:
                s += tl.load(r_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            s = s.to(x_ptr.dtype.element_ty).to(CT)
            rstd = tl.load(rstd_ptr + row).to(CT)
            xhat = s * k * rstd
            g = tl.load(g_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            go = g * z
            dxhat = go * w
            c2 = tl.sum(dxhat * xhat, axis=0) / n
            ds = (dxhat - xhat * c2) * rstd * k
            if HAS_GS:
                ds += tl.load(gs_ptr + row * D + offs, mask=md, other=0.0).to(CT)
            if WANT_DX:
                tl.store(dx_ptr + row * D + offs, (ds * z).to(dx_ptr.dtype.element_ty), mask=md)
            if WANT_DR:
                tl.store(dr_ptr + row * D + offs, ds.to(dr_ptr.dtype.element_ty), mask=md)
            dw += go * xhat
            dz += g * xhat * w + ds * x
    base = cols_ptr + pid * 2 * D
    tl.store(base + offs, dw.to(cols_ptr.dtype.element_ty), mask=md)
    tl.store(base + D + offs, dz.to(cols_ptr.dtype.element_ty), mask=md)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_rms_norm_fwd_triton(x, residual, weight, hidden_z, eps: float, want_sum: bool):
    """x: [N, d] contiguous -> (y [N, d], s [N, d] if want_sum else [0], rstd [N])."""
    N, D = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if want_sum else x.new_empty(0)
    rstd = torch.empty(N, dtype=_stat_dtype(x), device=x.device)
    if N > 0:
        bd = triton.next_power_of_2(D)
        with device_guard(x):
            _masked_rms_norm_fwd_kernel[(N,)](x, residual if residual is not None else x, weight,
                                              hidden_z if hidden_z is not None else weight, y, s if want_sum else y,
                                              rstd, D, eps, HAS_R=residual is not None, HAS_Z=hidden_z is not None,
                                              WANT_S=bool(want_sum), BLOCK_D=bd,
                                              num_warps=layer_norm_num_warps(bd, x.dtype))
    return y, s, rstd


def masked_rms_norm_bwd_triton(grad, grad_sum, x, residual, weight, hidden_z, rstd, needs):
    """Returns [dx, d residual, d weight, d hidden_z] (empty where not needed)."""
    N, D = x.shape
    want_dx, want_dr = bool(needs[0]), bool(needs[1]) and residual is not None
    dx = torch.empty_like(x) if want_dx else x.new_empty(0)
    dr = torch.empty_like(x) if want_dr else x.new_empty(0)
    progs = triton.cdiv(N, ROWS)
    cols = torch.zeros(max(progs, 1), 2, D, dtype=_stat_dtype(x), device=x.device)
    if N > 0:
        bd = triton.next_power_of_2(D)
        with device_guard(x):
            _masked_rms_norm_bwd_kernel[(progs,)](grad, grad_sum if grad_sum is not None else grad, x,
                                                  residual if residual is not None else x, weight,
                                                  hidden_z if hidden_z is not None else weight, rstd,
                                                  dx if want_dx else x, dr if want_dr else x, cols, N, D,
                                                  HAS_GS=grad_sum is not None, HAS_R=residual is not None,
                                                  HAS_Z=hidden_z is not None, WANT_DX=want_dx, WANT_DR=want_dr,
                                                  ROWS_PER=ROWS, BLOCK_D=bd,
                                                  num_warps=layer_norm_num_warps(bd, x.dtype))
    sums = cols.sum(0).to(x.dtype)
    e = lambda: x.new_empty(0)  # noqa: E731
    dw = sums[0].clone() if needs[2] else e()
    dz = sums[1].clone() if (needs[3] and hidden_z is not None) else e()
    return [dx, dr, dw, dz]
