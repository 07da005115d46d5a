"""Triton kernels of the gated masked FFN (cofi.ops.masked_ffn_gated: SwiGLU, GeGLU, ReGLU).

- ``_gated_fwd_kernel``: the gate and up tiles g = x wg[live]^T + bg[live], u = x w1[live]^T + b1[live]
  of one output block (stored for backward in h [M, 2L] = [g | u]) and a = act(g) * u * s.
- ``_gated_bwd_kernel``: G = grad w2[:, live] with the fused epilogue dh = [G s u act'(g) | G s act(g)]
  ([M, 2L]), am = act(g) u s, fg = act(g) u G (column sums -> d int_z, d mlp_z).
The other GEMMs are masked_ffn.py's ``_gather_gemm_kernel`` (same tile configuration, FFN_GEMM).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import device_guard
from .masked_ffn import _LAUNCH, BK, BM, BN, _acc, _act, _dact, _gemm, _gemm_tile, _grid, _ieee, _live, _scale


@triton.jit
def _gated_fwd_kernel(x_ptr, wg_ptr, w1_ptr, idx_ptr, bg_ptr, b1_ptr, s_ptr, h_ptr, a_ptr, M, L, D,
                      ACT: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # B[k, n] = w[idx[n], k]
    accg = _gemm_tile(x_ptr, wg_ptr, idx_ptr, M, L, D, D, 1, 1, D, offs_m, offs_n, 2, ACC, BLOCK_K, IEEE)
    accu = _gemm_tile(x_ptr, w1_ptr, idx_ptr, M, L, D, D, 1, 1, D, offs_m, offs_n, 2, ACC, BLOCK_K, IEEE)
    mn = offs_n < L
    mask = (offs_m < M)[:, None] & mn[None, :]
    unit = tl.load(idx_ptr + offs_n, mask=mn, other=0)
    g = accg + tl.load(bg_ptr + unit, mask=mn, other=0.0).to(ACC)[None, :]
    u = accu + tl.load(b1_ptr + unit, mask=mn, other=0.0).to(ACC)[None, :]
    s = tl.load(s_ptr + offs_n, mask=mn, other=0.0).to(ACC)
    hrow = offs_m[:, None] * (2 * L) + offs_n[None, :]
    tl.store(h_ptr + hrow, g.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + hrow + L, u.to(h_ptr.dtype.element_ty), mask=mask)
    out = offs_m[:, None] * L + offs_n[None, :]
    tl.store(a_ptr + out, (_act(g, ACT) * u * s[None, :]).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(g_ptr, w2_ptr, idx_ptr, h_ptr, s_ptr, dh_ptr, am_ptr, fg_ptr, M, L, D, F,
                      ACT: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # B[k, n] = w2[k, idx[n]]
    G = _gemm_tile(g_ptr, w2_ptr, idx_ptr, M, L, D, D, 1, F, 1, offs_m, offs_n, 2, ACC, BLOCK_K, IEEE)
    mn = offs_n < L
    mask = (offs_m < M)[:, None] & mn[None, :]
    hrow = offs_m[:, None] * (2 * L) + offs_n[None, :]
    hg = tl.load(h_ptr + hrow, mask=mask, other=0.0).to(ACC)
    hu = tl.load(h_ptr + hrow + L, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs_n, mask=mn, other=0.0).to(ACC)[None, :]
    f = _act(hg, ACT)
    Gs = G * s
    tl.store(dh_ptr + hrow, (Gs * hu * _dact(hg, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + hrow + L, (Gs * f).to(dh_ptr.dtype.element_ty), mask=mask)
    out = offs_m[:, None] * L + offs_n[None, :]
    tl.store(am_ptr + out, (f * hu * s).to(am_ptr.dtype.element_ty), mask=mask)
    tl.store(fg_ptr + out, (f * hu * G).to(fg_ptr.dtype.element_ty), mask=mask)


def masked_ffn_gated_fwd_triton(x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, act: int):
    """x: [N, d] contiguous -> (y [N, d], h [N, 2L])."""
    M, D = x.shape
    F = w1.shape[0]
    idx = _live(live, F, x.device)
    L = idx.shape[0]
    s = _scale(int_z, mlp_z, idx, x)
    h = torch.empty(M, 2 * L, dtype=x.dtype, device=x.device)
    a = torch.empty(M, L, dtype=x.dtype, device=x.device)
    if M > 0 and L > 0:
        with device_guard(x):
            _gated_fwd_kernel[_grid(M, L)](x, wg, w1, idx, bg, b1, s, h, a, M, L, D, ACT=act, ACC=_acc(x.dtype),
                                           IEEE=_ieee(x.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **_LAUNCH)
    b2m = (b2 * mlp_z if mlp_z is not None else b2).contiguous()
    # B[k, n] = w2[n, idx[k]]
    y = _gemm(a, w2, idx, 1, M, D, L, L, 1, 1, F, bias=b2m)
    return y, h


def masked_ffn_gated_bwd_triton(grad, x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, h, act: int, needs):
    """Returns the gradients of [x, wg, bg, w1, b1, w2, b2, int_z, mlp_z] (empty where not needed)."""
    M, D = x.shape
    F = w1.shape[0]
    idx = _live(live, F, x.device)
    L = idx.shape[0]
    s = _scale(int_z, mlp_z, idx, x)
    dh = torch.empty(M, 2 * L, dtype=x.dtype, device=x.device)
    am, fg = torch.empty(M, L, dtype=x.dtype, device=x.device), torch.empty(M, L, dtype=x.dtype, device=x.device)
    if M > 0 and L > 0:
        with device_guard(x):
            _gated_bwd_kernel[_grid(M, L)](grad, w2, idx, h, s, dh, am, fg, M, L, D, F, ACT=act, ACC=_acc(x.dtype),
                                           IEEE=_ieee(x.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **_LAUNCH)
    else:
        dh.zero_(), am.zero_(), fg.zero_()
    dhg, dhu = dh[:, :L], dh[:, L:]  # row stride 2L

    def full(part: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        return part if live is None else torch.zeros_like(like).index_copy_(dim, idx, part)

    def e():
        return grad.new_empty(0)

    P = fg.sum(0)
    m = mlp_z
    # dx = dhg wg[idx] + dhu w1[idx]: B[k, n] = w[idx[k], n]
    dx = (_gemm(dhg, wg, idx, 1, M, D, L, 2 * L, 1, D, 1) + _gemm(dhu, w1, idx, 1, M, D, L, 2 * L, 1, D, 1)
          if needs[0] else e())
    # dw = dh_part^T x: A[l, n] = dh_part[n, l]
    dwg = full(_gemm(dhg, x, None, 0, L, D, M, 1, 2 * L, D, 1), wg, 0) if needs[1] else e()
    dbg = full(dhg.sum(0), bg, 0) if needs[2] else e()
    dw1 = full(_gemm(dhu, x, None, 0, L, D, M, 1, 2 * L, D, 1), w1, 0) if needs[3] else e()
    db1 = full(dhu.sum(0), b1, 0) if needs[4] else e()
    dw2 = full(_gemm(grad, am, None, 0, D, L, M, 1, D, L, 1), w2, 1) if needs[5] else e()
    gsum = grad.sum(0)
    db2 = (gsum * m if m is not None else gsum.clone()) if needs[6] else e()
    dz = full(P * m if m is not None else P.clone(), int_z, 0) if (needs[7] and int_z is not None) else e()
    if needs[8] and mlp_z is not None:
        zl = int_z.index_select(0, idx) if int_z is not None else torch.ones_like(P)
        dm = ((P * zl).sum() + (gsum * b2).sum()).reshape(mlp_z.shape)
    else:
        dm = e()
    return [dx, dwg, dbg, dw1, db1, dw2, db2, dz, dm]
