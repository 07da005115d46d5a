"""Triton kernels of the hard-concrete op family.

Elementwise sample / keep-prob kernels (forward and backward), a rank-based deterministic-mask
kernel (rank of each entry within its row by pairwise comparison, so no sort is needed), and gated
row-sum reductions for the expected size. All run under TRITON_INTERPRET=1 on CPU tensors.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .configs import on_tensor_device

BLOCK = 1024


@triton.jit
def _clip01(x):
    """hardtanh(x, 0, 1) that keeps NaN (noise outside [0, 1]) as the reference does; tl.minimum /
    tl.maximum would turn it into 0."""
    return tl.where(x <= 0.0, 0.0, tl.where(x >= 1.0, 1.0, x))


@triton.jit
def _hard_concrete_sample_fwd_kernel(la_ptr, u_ptr, z_ptr, n, prm_ptr, BLOCK: tl.constexpr):
    t, l, r = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(la_ptr + offs, mask=m, other=0.0)
    u = tl.load(u_ptr + offs, mask=m, other=0.5)
    s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + a) / t)
    tl.store(z_ptr + offs, _clip01(s * (r - l) + l), mask=m)


@triton.jit
def _hard_concrete_sample_bwd_kernel(g_ptr, la_ptr, u_ptr, out_ptr, n, prm_ptr, BLOCK: tl.constexpr):
    t, l, r = tl.load(prm_ptr), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    a = tl.load(la_ptr + offs, mask=m, other=0.0)
    u = tl.load(u_ptr + offs, mask=m, other=0.5)
    s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + a) / t)
    sbar = s * (r - l) + l
    d = tl.where((sbar > 0.0) & (sbar < 1.0), g * (r - l) * s * (1.0 - s) / t, 0.0)
    tl.store(out_ptr + offs, d, mask=m)


@triton.jit
def _hard_concrete_keep_prob_fwd_kernel(la_ptr, p_ptr, n, prm_ptr, BLOCK: tl.constexpr):
    q0, eps = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(la_ptr + offs, mask=m, other=0.0)
    q = tl.sigmoid(q0 - a)
    q = tl.where(q < eps, eps, tl.where(q > 1.0 - eps, 1.0 - eps, q))
    tl.store(p_ptr + offs, 1.0 - q, mask=m)


@triton.jit
def _hard_concrete_keep_prob_bwd_kernel(g_ptr, la_ptr, out_ptr, n, prm_ptr, BLOCK: tl.constexpr):
    q0, eps = tl.load(prm_ptr), tl.load(prm_ptr + 1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    a = tl.load(la_ptr + offs, mask=m, other=0.0)
    q = tl.sigmoid(q0 - a)
    d = tl.where((q > eps) & (q < 1.0 - eps), g * q * (1.0 - q), 0.0)
    tl.store(out_ptr + offs, d, mask=m)


@triton.jit
def _hard_concrete_rank_kernel(la_ptr, rank_ptr, n, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """rank[row, i] = #{j : a_j < a_i or (a_j == a_i and j < i)} (a stable ascending sort's position)."""
    row = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < n
    a_i = tl.load(la_ptr + row * n + offs_i, mask=mi, other=0.0)
    cnt = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for j0 in range(0, n, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < n
        a_j = tl.load(la_ptr + row * n + offs_j, mask=mj, other=0.0)
        before = (a_j[None, :] < a_i[:, None]) | ((a_j[None, :] == a_i[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        cnt += tl.sum((before & mj[None, :]).to(tl.int32), axis=1)
    tl.store(rank_ptr + row * n + offs_i, cnt, mask=mi)


@triton.jit
def _gated_rowsum_kernel(x_ptr, gate_ptr, out_ptr, width, HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
    """out[row] = gate[row] * sum(x[row, :])."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for c0 in range(0, width, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * width + offs, mask=offs < width, other=0.0)
    s = tl.sum(acc, axis=0)
    if HAS_GATE:
        s = s * tl.load(gate_ptr + row)
    tl.store(out_ptr + row, s)


def _params(ref: torch.Tensor, *values: float) -> torch.Tensor:
    """Scalar parameters as a tensor of the data dtype: Triton may pass Python floats as float32,
    which would cost float64 inputs their precision (1 - eps, l = -0.1)."""
    return torch.tensor(values, dtype=ref.dtype, device=ref.device)


def _grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, BLOCK)),)


def _q0(t: float, l: float, r: float) -> float:
    xn = (0.0 - l) / (r - l)
    return (math.log(xn) - math.log1p(-xn)) * t


@on_tensor_device
def hard_concrete_sample_fwd_triton(log_alpha, u, t, l, r):
    z = torch.empty_like(log_alpha)
    n = log_alpha.numel()
    if n:
        _hard_concrete_sample_fwd_kernel[_grid(n)](log_alpha, u, z, n, _params(log_alpha, t, l, r), BLOCK=BLOCK)
    return z


@on_tensor_device
def hard_concrete_sample_bwd_triton(grad, log_alpha, u, t, l, r):
    out = torch.empty_like(log_alpha)
    n = log_alpha.numel()
    if n:
        _hard_concrete_sample_bwd_kernel[_grid(n)](grad, log_alpha, u, out, n, _params(log_alpha, t, l, r), BLOCK=BLOCK)
    return out


@on_tensor_device
def hard_concrete_keep_prob_fwd_triton(log_alpha, t, l, r, eps):
    p = torch.empty_like(log_alpha)
    n = log_alpha.numel()
    if n:
        _hard_concrete_keep_prob_fwd_kernel[_grid(n)](log_alpha, p, n, _params(log_alpha, _q0(t, l, r), eps), BLOCK=BLOCK)
    return p


@on_tensor_device
def hard_concrete_keep_prob_bwd_triton(grad, log_alpha, t, l, r, eps):
    out = torch.empty_like(log_alpha)
    n = log_alpha.numel()
    if n:
        _hard_concrete_keep_prob_bwd_kernel[_grid(n)](grad, log_alpha, out, n, _params(log_alpha, _q0(t, l, r), eps), BLOCK=BLOCK)
    return out


@on_tensor_device
def hard_concrete_deterministic_triton(log_alpha, binary, t, l, r, eps):
    rows, n = log_alpha.shape
    if log_alpha.numel() == 0:
        return torch.empty_like(log_alpha)
    keep = hard_concrete_keep_prob_fwd_triton(log_alpha, t, l, r, eps)
    rowsum = torch.empty(rows, dtype=log_alpha.dtype, device=log_alpha.device)
    _gated_rowsum_kernel[(rows,)](keep, keep, rowsum, n, HAS_GATE=False, BLOCK=128)
    num_zeros = torch.round(n - rowsum)
    rank = torch.empty((rows, n), dtype=torch.int32, device=log_alpha.device)
    _hard_concrete_rank_kernel[(rows, triton.cdiv(n, 64))](log_alpha, rank, n, BLOCK_I=64, BLOCK_J=64)
    z = torch.ones_like(log_alpha) if binary else torch.sigmoid(log_alpha / t * 0.8)
    return torch.where(rank < num_zeros[:, None], torch.zeros_like(z), z)


def _gated_score(units, gate, L, W, ref):
    if units is None:
        rows = torch.full((L,), float(W), dtype=ref.dtype, device=ref.device)
        return (rows * gate).sum() if gate is not None else rows.sum(), rows
    rows = torch.empty(L, dtype=ref.dtype, device=ref.device)
    _gated_rowsum_kernel[(L,)](units, units, rows, W, HAS_GATE=False, BLOCK=256)
    return ((rows * gate).sum() if gate is not None else rows.sum()), rows


def _consts(L, d, H, F):
    per_head = (4 * d * d + 4 * d) / H
    per_mlp = 2 * d * F + 5 * d
    return per_head / d, per_head, float(per_mlp // F), L * H * per_head + L * per_mlp


@on_tensor_device
def expected_size_fwd_triton(hidden, head, mha, inter, ffn, L, d, H, F):
    ref = next(x for x in (hidden, head, mha, inter, ffn) if x is not None)
    pair_head, per_head, per_unit, full = _consts(L, d, H, F)
    head_score, _ = _gated_score(head, mha, L, H, ref)
    int_score, _ = _gated_score(inter, ffn, L, F, ref)
    if hidden is not None:
        hs = torch.empty(1, dtype=ref.dtype, device=ref.device)
        _gated_rowsum_kernel[(1,)](hidden, hidden, hs, d, HAS_GATE=False, BLOCK=256)
        e = hs[0] * (head_score * pair_head + int_score * 2.0)
    else:
        e = head_score * per_head + int_score * per_unit
    return e.clone(), (1.0 - e / full)


@on_tensor_device
def expected_size_bwd_triton(g_params, g_sparsity, hidden, head, mha, inter, ffn, L, d, H, F):
    ref = next(x for x in (hidden, head, mha, inter, ffn) if x is not None)
    pair_head, per_head, per_unit, full = _consts(L, d, H, F)
    g_e = g_params - g_sparsity / full
    head_score, head_rows = _gated_score(head, mha, L, H, ref)
    int_score, int_rows = _gated_score(inter, ffn, L, F, ref)
    if hidden is not None:
        hs = torch.empty(1, dtype=ref.dtype, device=ref.device)
        _gated_rowsum_kernel[(1,)](hidden, hidden, hs, d, HAS_GATE=False, BLOCK=256)
        d_head, d_int = hs[0] * pair_head, hs[0] * 2.0
    else:
        d_head = torch.tensor(per_head, dtype=ref.dtype, device=ref.device)
        d_int = torch.tensor(per_unit, dtype=ref.dtype, device=ref.device)
    one = torch.ones(L, dtype=ref.dtype, device=ref.device)
    return [
        ref.new_empty(0) if hidden is None else (g_e * (head_score * pair_head + int_score * 2.0)).expand_as(hidden).clone(),
        ref.new_empty(0) if head is None else (g_e * d_head * (one if mha is None else mha))[:, None].expand_as(head).clone(),
        ref.new_empty(0) if mha is None else g_e * d_head * head_rows,
        ref.new_empty(0) if inter is None else (g_e * d_int * (one if ffn is None else ffn))[:, None].expand_as(inter).clone(),
        ref.new_empty(0) if ffn is None else g_e * d_int * int_rows,
    ]
