"""Triton flash attention with per-head gates for ``cofi.ops.masked_attention``.

Forward: one program per (query block, batch x live head); online softmax over key blocks, the gate
applied in the epilogue, per-row log-sum-exp stored for the backward. Dead heads (gate exactly 0)
are never launched: the grid runs over a live-head index list built once per call; their outputs
are pre-filled (out = 0, lse = +inf, gradients 0). Backward recomputes the probabilities: one
kernel per key block accumulates dK, dV over query blocks (no atomics), one per query block
accumulates dQ. Grouped-query attention: query head h reads K/V head h // G (G = H / Hkv); the dK/dV
kernel writes one slice per query head and the launcher sums each group's slices. Causal: key loops
stop at the diagonal block (forward, dQ) or start there (dK/dV), so the blocks above it are never
computed; the diagonal block masks j > i. Padded keys are loaded as 0 and their scores set to -inf, so NaN in padding never
reaches a result. Dropout uses the counter-based hash of reference/masked_attention.py.

The grid is 1-D over (batch x live head, row block) and offsets are 64-bit (see ``_program``).
Tiles per (dtype, head dim): ``configs.attention_config``. Runs under ``TRITON_INTERPRET=1`` on CPU
tensors (float32/float64) for tests.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import AttentionConfig, Tile, attention_config, device_guard, use_gpu_configs


@triton.jit
def _mix(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _dropout_scale(seed_ptr, bh, offs_m, offs_n, thr, inv):
    """[BLOCK_M, BLOCK_N] dropout factor: inv where kept, 0 where dropped (hash of seed, bh, i, j)."""
    s0 = tl.load(seed_ptr).to(tl.uint32)
    s1 = tl.load(seed_ptr + 1).to(tl.uint32)
    base = _mix(s0 ^ _mix(bh.to(tl.uint32) + s1))
    row = _mix(base ^ _mix(offs_m.to(tl.uint32)))
    u = _mix(row[:, None] + _mix(offs_n.to(tl.uint32))[None, :])
    keep = (u.to(tl.int64) >= thr).to(tl.float32)  # exact 0 / 1; inv applied after in the caller's dtype
    return keep, inv


@triton.jit
def _program(S, n_live, live_ptr, BLOCK: tl.constexpr):
    """(row block, batch, head) of this program; int64 block index, batch and head so that every
    offset built from them is 64-bit. The grid is 1-D (row blocks fastest): a batch x heads axis
    on grid y would be capped at 65,535."""
    n_blocks = tl.cdiv(S, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    pid_bh = pid // n_blocks
    b = pid_bh // n_live
    h = tl.load(live_ptr + pid_bh % n_live).to(tl.int64)
    return pid % n_blocks, b, h


@triton.jit
def _masked_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, mask_ptr, seed_ptr, live_ptr, out_ptr, lse_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    H, S, D, n_live, scale, thr, inv, G,
    HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    pid_m, b, h = _program(S, n_live, live_ptr, BLOCK_M)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    n_end = S
    if CAUSAL:
        n_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        if HAS_MASK:
            n_ok = n_ok & (tl.load(mask_ptr + b * S + offs_n, mask=offs_n < S, other=0) != 0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + b * skb + hk * skh + rows * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + hk * svh + rows * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep, inv_ = _dropout_scale(seed_ptr, b * H + h, offs_m, offs_n, thr, inv)
            p = p * keep * inv_
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    zh = 1.0
    if HAS_Z:
        zh = tl.load(z_ptr + h).to(ACC)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = tl.where(empty[:, None], 0.0, acc * (zh / l_safe)[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.log(l_safe))
    base = (b * H + h) * S
    tl.store(out_ptr + (base + offs_m[:, None]) * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + base + offs_m, lse.to(lse_ptr.dtype.element_ty), mask=m_ok)


@triton.jit
def _probs(q, k, lse, n_ok, offs_m, offs_n, scale, ACC: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    p = tl.exp(s - lse[:, None])  # lse = +inf on fully masked rows -> 0
    ok = n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(ok, p, 0.0)


@triton.jit
def _masked_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, mask_ptr, seed_ptr, live_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    H, S, D, n_live, scale, thr, inv, G,
    HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """dK, dV of one key block for query head h (accumulated over all query blocks); written to
    query head h's slice of [B, H, S, D] buffers."""
    pid_n, b, h = _program(S, n_live, live_ptr, BLOCK_N)
    hk = h // G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < S
    if HAS_MASK:
        n_ok = n_ok & (tl.load(mask_ptr + b * S + offs_n, mask=offs_n < S, other=0) != 0)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
    zh = 1.0
    if HAS_Z:
        zh = tl.load(z_ptr + h).to(ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    base = (b * H + h) * S
    m_begin = 0
    if CAUSAL:
        m_begin = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(m_begin, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S
        md = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqs + offs_d[None, :], mask=md,
                    other=0.0)
        g = tl.load(g_ptr + (base + offs_m[:, None]) * D + offs_d[None, :], mask=md, other=0.0).to(ACC) * zh
        lse = tl.load(lse_ptr + base + offs_m, mask=m_ok, other=float("inf")).to(ACC)
        delta = tl.load(delta_ptr + base + offs_m, mask=m_ok, other=0.0).to(ACC)
        p = _probs(q, k, lse, n_ok, offs_m, offs_n, scale, ACC, PREC, CAUSAL)
        dp = tl.dot(g.to(v.dtype), tl.trans(v), input_precision=PREC, out_dtype=ACC)
        if DROPOUT:
            keep, inv_ = _dropout_scale(seed_ptr, b * H + h, offs_m, offs_n, thr, inv)
            pd = p * keep * inv_
            dp = dp * keep * inv_
        else:
            pd = p
        dv += tl.dot(tl.trans(pd).to(q.dtype), g.to(q.dtype), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None]) * scale
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC, out_dtype=ACC)
    st = kv_mask & (offs_n < S)[:, None]
    tl.store(dk_ptr + (base + offs_n[:, None]) * D + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=st)
    tl.store(dv_ptr + (base + offs_n[:, None]) * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=st)


@triton.jit
def _masked_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, mask_ptr, seed_ptr, live_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
    H, S, D, n_live, scale, thr, inv, G,
    HAS_Z: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """dQ of one query block (accumulated over all key blocks)."""
    pid_m, b, h = _program(S, n_live, live_ptr, BLOCK_M)
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < D
    md = m_ok[:, None] & d_ok[None, :]
    base = (b * H + h) * S
    zh = 1.0
    if HAS_Z:
        zh = tl.load(z_ptr + h).to(ACC)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :], mask=md, other=0.0)
    g = tl.load(g_ptr + (base + offs_m[:, None]) * D + offs_d[None, :], mask=md, other=0.0).to(ACC) * zh
    lse = tl.load(lse_ptr + base + offs_m, mask=m_ok, other=float("inf")).to(ACC)
    delta = tl.load(delta_ptr + base + offs_m, mask=m_ok, other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    n_end = S
    if CAUSAL:
        n_end = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        if HAS_MASK:
            n_ok = n_ok & (tl.load(mask_ptr + b * S + offs_n, mask=offs_n < S, other=0) != 0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        rows = offs_n.to(tl.int64)[:, None]
        k = tl.load(k_ptr + b * skb + hk * skh + rows * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * svb + hk * svh + rows * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        p = _probs(q, k, lse, n_ok, offs_m, offs_n, scale, ACC, PREC, CAUSAL)
        dp = tl.dot(g.to(v.dtype), tl.trans(v), input_precision=PREC, out_dtype=ACC)
        if DROPOUT:
            keep, inv_ = _dropout_scale(seed_ptr, b * H + h, offs_m, offs_n, thr, inv)
            dp = dp * keep * inv_
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    tl.store(dq_ptr + (base + offs_m[:, None]) * D + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=md)


# ============================== launchers =========================================================

def _config(q: torch.Tensor) -> tuple[AttentionConfig, dict]:
    """(tiles, constexprs shared by the three kernels) for q [B, H, S, D]."""
    c = attention_config(q.dtype, q.shape[-1], use_gpu_configs(q.device))
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    prec = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"
    return c, dict(ACC=acc, PREC=prec, BLOCK_D=c.block_d)


def _tile(t: Tile) -> dict:
    return dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages)


def _common(q, k, v, head_z, mask, dropout_p, seed):
    live = (torch.nonzero(head_z).flatten() if head_z is not None
            else torch.arange(q.shape[1], device=q.device)).to(torch.int32)
    dummy = torch.zeros(2, dtype=torch.int64, device=q.device)
    thr = min(int(round(dropout_p * 4294967296.0)), 0xFFFFFFFF)
    inv = 1.0 / (1.0 - dropout_p)
    ptrs = (head_z if head_z is not None else dummy,
            mask if mask is not None else dummy,
            seed if (seed is not None and dropout_p > 0.0) else dummy,
            live)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    flags = dict(HAS_Z=head_z is not None, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0.0)
    return live, thr, inv, ptrs, strides, flags


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype


def _groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """G = H / Hkv: query heads per K/V head."""
    return q.shape[1] // k.shape[1] if k.shape[1] else 1


def masked_attention_fwd_triton(q, k, v, head_z, mask, scale, dropout_p, seed, causal=False):
    """(out [B, H, S, D], lse [B, H, S]) for k, v [B, Hkv, S, D]; see the module docstring."""
    Bsz, H, S, D = q.shape
    out = torch.zeros((Bsz, H, S, D), dtype=q.dtype, device=q.device)
    lse = torch.full((Bsz, H, S), float("inf"), dtype=_lse_dtype(q), device=q.device)
    live, thr, inv, ptrs, strides, flags = _common(q, k, v, head_z, mask, dropout_p, seed)
    n_live = live.numel()
    if n_live == 0 or out.numel() == 0:
        return out, lse
    cfg, const = _config(q)
    grid = (triton.cdiv(S, cfg.fwd.block_m) * Bsz * n_live,)
    with device_guard(q):
        _masked_attention_fwd_kernel[grid](q, k, v, *ptrs, out, lse, *strides, H, S, D, n_live, float(scale), thr,
                                           inv, _groups(q, k), **flags, **const, **_tile(cfg.fwd), CAUSAL=causal)
    return out, lse


def masked_attention_bwd_triton(grad, q, k, v, head_z, mask, out, lse, scale, dropout_p, seed, causal=False):
    """(dq, dk, dv, d_head_z) with dq [B, H, S, D], dk/dv [B, Hkv, S, D] and d_head_z [H] (or [0]
    without gates)."""
    Bsz, H, S, D = q.shape
    Hkv, G = k.shape[1], _groups(q, k)
    dq = torch.zeros((Bsz, H, S, D), dtype=q.dtype, device=q.device)
    # one slice per query head, summed over each K/V group below (in float32 for half inputs)
    dk = torch.zeros((Bsz, H, S, D), dtype=q.dtype if G == 1 else _lse_dtype(q), device=q.device)
    dv = torch.zeros_like(dk)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # delta_i = rowsum(dO_eff * O) = rowsum(grad * out) (out is gated); d z_h = sum delta / z_h.
    delta = (grad.to(acc) * out.to(acc)).sum(-1)
    if head_z is not None:
        zl = head_z.to(acc)
        live_mask = zl != 0
        dz = torch.where(live_mask, delta.sum(dim=(0, 2)) / torch.where(live_mask, zl, torch.ones_like(zl)),
                         torch.zeros_like(zl)).to(head_z.dtype)
    else:
        dz = q.new_empty(0)
    live, thr, inv, ptrs, strides, flags = _common(q, k, v, head_z, mask, dropout_p, seed)
    n_live = live.numel()
    if n_live > 0 and dq.numel() > 0:
        cfg, const = _config(q)
        args = (*strides, H, S, D, n_live, float(scale), thr, inv, G)
        with device_guard(q):
            _masked_attention_bwd_kernel[(triton.cdiv(S, cfg.dkdv.block_n) * Bsz * n_live,)](
                q, k, v, *ptrs, grad, lse, delta, dk, dv, *args, **flags, **const, **_tile(cfg.dkdv), CAUSAL=causal)
            _masked_attention_bwd_dq_kernel[(triton.cdiv(S, cfg.dq.block_m) * Bsz * n_live,)](
                q, k, v, *ptrs, grad, lse, delta, dq, *args, **flags, **const, **_tile(cfg.dq), CAUSAL=causal)
    if G != 1:
        dk = dk.view(Bsz, Hkv, G, S, D).sum(2).to(q.dtype)
        dv = dv.view(Bsz, Hkv, G, S, D).sum(2).to(q.dtype)
    return dq, dk, dv, dz
