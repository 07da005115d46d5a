"""Triton kernels of cofi.ops.masked_ffn: GEMMs that read live units through an index list.

- ``_masked_ffn_fwd_kernel``: h = x w1[live]^T with the fused epilogue h += b1[live] (stored for
  backward), a = act(h) * s (s = int_z[live] * mlp_z).
- ``_masked_ffn_bwd_kernel``: G = grad w2[:, live] with the fused backward epilogue
  dh = G * s * act'(h), am = act(h) * s, fg = act(h) * G (column sums -> d int_z, d mlp_z).
- ``_gather_gemm_kernel``: C = A B (+ bias) with B's rows or columns read through an index list;
  the second forward GEMM and dx, dw1, dw2 of the backward.
Activation codes as ``vocab.GATE_FUNCTIONS`` (3 = SiLU: the gated kernels of masked_ffn_gated.py only).
Runs compiled on CUDA and under TRITON_INTERPRET=1 on CPU tensors (fp32/fp64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import FFN_GEMM, device_guard

CFG = FFN_GEMM
BM, BN, BK = CFG.block_m, CFG.block_n, CFG.block_k
_LAUNCH = dict(num_warps=CFG.num_warps, num_stages=CFG.num_stages)


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 1:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * h * (1.0 + t)
    elif ACT == 3:
        return h * tl.sigmoid(h)
    else:
        return tl.where(h > 0, h, 0.0)


@triton.jit
def _dact(h, ACT: tl.constexpr):
    if ACT == 0:
        return 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 1:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * h * h)
    elif ACT == 3:
        sg = tl.sigmoid(h)
        return sg * (1.0 + h * (1.0 - sg))
    else:
        return tl.where(h > 0, 1.0, 0.0)


@triton.jit
def _gemm_tile(a_ptr, b_ptr, idx_ptr, M, N, K, sam, sak, sbk, sbn, offs_m, offs_n,
               IDX: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """acc[m, n] = sum_k A[m, k] B[k, n]; IDX 1: B row k is idx[k]; IDX 2: B column n is idx[n].

    offs_m, offs_n: int64 (token counts times widths exceed 2**31); offs_k is widened per step."""
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=ACC)
    mm = offs_m < M
    mn = offs_n < N
    if IDX == 2:
        col = tl.load(idx_ptr + offs_n, mask=mn, other=0).to(tl.int64)
    else:
        col = offs_n
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mk = offs_k < K
        if IDX == 1:
            row = tl.load(idx_ptr + offs_k, mask=mk, other=0).to(tl.int64)
        else:
            row = offs_k
        a = tl.load(a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_ptr + row[:, None] * sbk + col[None, :] * sbn, mask=mk[:, None] & mn[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
        else:
            acc += tl.dot(a, b, out_dtype=ACC)
    return acc


@triton.jit
def _masked_ffn_fwd_kernel(x_ptr, w1_ptr, idx_ptr, b1_ptr, s_ptr, h_ptr, a_ptr, M, L, D,
                           ACT: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # B[k, n] = w1[idx[n], k]
    acc = _gemm_tile(x_ptr, w1_ptr, idx_ptr, M, L, D, D, 1, 1, D, offs_m, offs_n, 2, ACC, BLOCK_K, IEEE)
    mn = offs_n < L
    mask = (offs_m < M)[:, None] & mn[None, :]
    unit = tl.load(idx_ptr + offs_n, mask=mn, other=0)
    h = acc + tl.load(b1_ptr + unit, mask=mn, other=0.0).to(ACC)[None, :]
    s = tl.load(s_ptr + offs_n, mask=mn, other=0.0).to(ACC)
    out = offs_m[:, None] * L + offs_n[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + out, (_act(h, ACT) * s[None, :]).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _masked_ffn_bwd_kernel(g_ptr, w2_ptr, idx_ptr, h_ptr, s_ptr, dh_ptr, am_ptr, fg_ptr, M, L, D, F,
                           ACT: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # B[k, n] = w2[k, idx[n]]
    G = _gemm_tile(g_ptr, w2_ptr, idx_ptr, M, L, D, D, 1, F, 1, offs_m, offs_n, 2, ACC, BLOCK_K, IEEE)
    mn = offs_n < L
    mask = (offs_m < M)[:, None] & mn[None, :]
    out = offs_m[:, None] * L + offs_n[None, :]
    h = tl.load(h_ptr + out, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs_n, mask=mn, other=0.0).to(ACC)[None, :]
    f = _act(h, ACT)
    tl.store(dh_ptr + out, (G * s * _dact(h, ACT)).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(am_ptr + out, (f * s).to(am_ptr.dtype.element_ty), mask=mask)
    tl.store(fg_ptr + out, (f * G).to(fg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_gemm_kernel(a_ptr, b_ptr, idx_ptr, bias_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn,
                        IDX: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _gemm_tile(a_ptr, b_ptr, idx_ptr, M, N, K, sam, sak, sbk, sbn, offs_m, offs_n, IDX, ACC, BLOCK_K, IEEE)
    mn = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mn, other=0.0).to(ACC)[None, :]
    mask = (offs_m < M)[:, None] & mn[None, :]
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


# ============================== launchers =========================================================

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _grid(M: int, N: int):
    return (triton.cdiv(max(M, 1), BM), triton.cdiv(max(N, 1), BN))


def _gemm(a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor | None, idx_mode: int, M: int, N: int, K: int,
          sam: int, sak: int, sbk: int, sbn: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.copy_(bias.expand(M, N)) if bias is not None else c.zero_()
    dummy = idx if idx is not None else torch.zeros(1, dtype=torch.int64, device=a.device)
    with device_guard(a):
        _gather_gemm_kernel[_grid(M, N)](a, b, dummy, bias if bias is not None else c, c, M, N, K, sam, sak, sbk,
                                         sbn, IDX=idx_mode, HAS_BIAS=bias is not None, ACC=_acc(a.dtype),
                                         IEEE=_ieee(a.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **_LAUNCH)
    return c


def _live(live: torch.Tensor | None, F: int, device: torch.device) -> torch.Tensor:
    return live if live is not None else torch.arange(F, dtype=torch.int64, device=device)


def _scale(int_z, mlp_z, idx, like):
    s = int_z.index_select(0, idx) if int_z is not None else torch.ones(idx.shape[0], dtype=like.dtype, device=like.device)
    return (s * mlp_z if mlp_z is not None else s).contiguous()


def masked_ffn_fwd_triton(x, w1, b1, w2, b2, int_z, mlp_z, live, act: int):
    """x: [N, d] contiguous -> (y [N, d], h [N, L])."""
    M, D = x.shape
    F = w1.shape[0]
    idx = _live(live, F, x.device)
    L = idx.shape[0]
    s = _scale(int_z, mlp_z, idx, x)
    h = torch.empty(M, L, dtype=x.dtype, device=x.device)
    a = torch.empty_like(h)
    if M > 0 and L > 0:
        with device_guard(x):
            _masked_ffn_fwd_kernel[_grid(M, L)](x, w1, idx, b1, s, h, a, M, L, D, ACT=act, ACC=_acc(x.dtype),
                                                IEEE=_ieee(x.dtype), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **_LAUNCH)
    b2m = (b2 * mlp_z if mlp_z is not None else b2).contiguous()
    # B[k, n] = w2[n, idx[k]]
    y = _gemm(a, w2, idx, 1, M, D, L, L, 1, 1, F, bias=b2m)
    return y, h


def masked_ffn_bwd_triton(grad, x, w1, b1, w2, b2, int_z, mlp_z, live, h, act: int, needs):
    """Returns [dx, dw1, db1, dw2, db2, d int_z, d mlp_z] (empty where not needed)."""
    M, D = x.shape
    F = w1.shape[0]
    idx = _live(live, F, x.device)
    L = idx.shape[0]
    s = _scale(int_z, mlp_z, idx, x)
    dh = torch.empty(M, L, dtype=x.dtype, device=x.device)
    am, fg = torch.empty_like(dh), torch.empty_like(dh)
    if M > 0 and L > 0:
        with device_guard(x):
            _masked_ffn_bwd_kernel[_grid(M, L)](grad, w2, idx, h, s, dh, am, fg, M, L, D, F, ACT=act,
                                                ACC=_acc(x.dtype), IEEE=_ieee(x.dtype), BLOCK_M=BM, BLOCK_N=BN,
                                                BLOCK_K=BK, **_LAUNCH)
    else:
        dh.zero_(), am.zero_(), fg.zero_()

    def full(part: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        if live is None:
            return part
        return torch.zeros_like(like).index_copy_(dim, idx, part)

    def e():
        return grad.new_empty(0)

    P = fg.sum(0)
    m = mlp_z if mlp_z is not None else None
    # dx = dh w1[idx]: B[k, n] = w1[idx[k], n]
    dx = _gemm(dh, w1, idx, 1, M, D, L, L, 1, D, 1) if needs[0] else e()
    dw1 = full(_gemm(dh, x, None, 0, L, D, M, 1, L, D, 1), w1, 0) if needs[1] else e()
    db1 = full(dh.sum(0), b1, 0) if needs[2] else e()
    dw2 = full(_gemm(grad, am, None, 0, D, L, M, 1, D, L, 1), w2, 1) if needs[3] else e()
    gsum = grad.sum(0)
    db2 = (gsum * m if m is not None else gsum.clone()) if needs[4] else e()
    dz = full(P * m if m is not None else P.clone(), int_z, 0) if (needs[5] and int_z is not None) else e()
    if needs[6] and mlp_z is not None:
        zl = int_z.index_select(0, idx) if int_z is not None else torch.ones_like(P)
        dm = ((P * zl).sum() + (gsum * b2).sum()).reshape(mlp_z.shape)
    else:
        dm = e()
    return [dx, dw1, db1, dw2, db2, dz, dm]
