"""Fused multi-head attention with per-head gates: ``cofi.ops.masked_attention``.

out[:, h] = head_z[h] * softmax(q_h k_g^T * scale + padding (+ causal)) v_g, with q of shape
[B, H, S, D] and k, v of shape [B, Hkv, S, D] (grouped-query attention: Hkv divides H and query head h
reads K/V head g = h // (H / Hkv), as transformers' Llama; Hkv = H is plain multi-head attention; H
may be 0 and may change from call to call). ``causal``: query i sees keys j <= i only; the kernels
skip the key blocks above the diagonal. ``kv_z`` [Hkv] gates whole K/V groups: it multiplies the
gates of the group's query heads (in differentiable torch code, before the custom op), so a dead
group is a run of dead query heads and its K/V are never read. Heads whose gate is exactly 0 are not computed: the
kernels build the live-head index list once per call and run only those heads; dead heads get
out = 0, lse = +inf, and zero gradients (d head_z included, see ``masked_attention_core_ref``).

Registered ops:

- ``cofi::masked_attention(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed, backend,
  causal=False) -> (out, lse)``: lse [B, H, S] is the per-row log-sum-exp the backward needs (no [S, S] tensor is
  kept); float32 for half inputs.
- ``cofi::masked_attention_backward(grad, q, k, v, head_z, key_padding_mask, out, lse, scale,
  dropout_p, seed, backend, causal=False) -> (dq, dk, dv, d_head_z)`` (dk, dv: k's shape); d_head_z is an empty tensor when head_z
  is None. Double backward is not supported.

Packed QKV: q, k and v may be strided views (last dim contiguous) such as
``qkv[:, :, i].transpose(1, 2)`` of a fused projection's [B, S, 3, H, D] output; kernels honour the
strides, so no copy is made (``masked_attention_packed`` does the slicing). Views whose rows are not
distinct (row stride < D: ``expand`` / ``broadcast_to`` along S, ``unfold`` / ``as_strided``
windows) or not unit-strided along D are copied first, here and in the C++ entry points
(docs/ops-inputs.md).

Backends: ``native``, ``triton`` and ``reference`` implement the registered ops; ``sdpa``
(``masked_attention_sdpa``) is plain torch code around ``scaled_dot_product_attention`` that
``masked_attention`` runs instead of them (first on CUDA under ``auto``; no dropout).

Dropout: the seed (int64 [2]) is drawn from ``generator``; the keep mask is a counter-based hash of
(seed, b, h, i, j) that the reference and every kernel compute identically
(``reference/masked_attention.py``), so results are reproducible and testable across backends.
"""
from __future__ import annotations

import math

import torch

from .. import _ext
from ..errors import UserError
from . import _backends as B
from ._validate import FLOAT_DTYPES, check_float, check_tensor
from . import masked_attention_sdpa  # noqa: F401  registers the composite 'sdpa' backend
from .reference.masked_attention import (attention_keep, dropout_keep, dropout_seed, masked_attention_core_ref,
                                         repeat_kv)

OP = "masked_attention"
# CPU native computes float16 / bfloat16 in float (csrc/masked_attention/masked_attention_cpu.cpp).
_NATIVE_DTYPES = {"cpu": FLOAT_DTYPES,
                  "cuda": (torch.float16, torch.bfloat16, torch.float32)}
_TRITON_DTYPES = {"cpu": FLOAT_DTYPES,
                  "cuda": (torch.float16, torch.bfloat16, torch.float32)}
_REF_DTYPES = {"cpu": FLOAT_DTYPES, "cuda": FLOAT_DTYPES}
CUDA_MAX_D = 128  # the CUDA kernel keeps one query row's head_dim in registers


def _causal_gqa(q: torch.Tensor, rest: tuple[object, ...]) -> tuple[bool, bool]:
    """(causal, grouped-query) of a fwd (q, k, v, ..., causal) or bwd (grad, q, k, v, ..., causal) call."""
    causal = bool(rest[-1]) if rest and isinstance(rest[-1], bool) else False
    gqa = any(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] != q.shape[1] for t in rest[:3])
    return causal, gqa


def _native_reasons(q: torch.Tensor, *rest: object) -> list[str]:
    why = B.native_reasons(q.device, "masked_attention_fwd_native") + B.dtype_reasons("q", q, _NATIVE_DTYPES)
    return why + (cuda_kernel_reasons(q, *rest) if q.device.type == "cuda" else [])


def cuda_kernel_reasons(q: torch.Tensor, *rest: object) -> list[str]:
    """What the CUDA kernel (csrc/masked_attention/masked_attention_cuda.cu) lacks for this call."""
    why = []
    if q.shape[-1] > CUDA_MAX_D:
        why.append(f"head dim {q.shape[-1]} > {CUDA_MAX_D} not supported by the CUDA kernel")
    causal, gqa = _causal_gqa(q, rest)
    if causal:
        why.append("causal=True: the CUDA kernel has no causal masking (use sdpa or triton)")
    if gqa:
        why.append("k / v with fewer heads than q: the CUDA kernel has no grouped-query attention (use sdpa or triton)")
    return why


def _triton_reasons(q: torch.Tensor, *rest: object) -> list[str]:
    from cofi_kernels.configs import attention_reasons  # head dim and shared-memory fit; imports no triton

    return B.triton_reasons(q.device) + B.dtype_reasons("q", q, _TRITON_DTYPES) + attention_reasons(q)


def _ref_reasons(q: torch.Tensor, *rest: object) -> list[str]:
    return B.dtype_reasons("q", q, _REF_DTYPES)


def _triton():
    import cofi_kernels.masked_attention as k  # lazy: importing triton costs ~1 s

    return k


# ============================== reference backend =================================================

def _fwd_ref(q, k, v, head_z, mask, scale, dropout_p, seed, causal=False):
    return masked_attention_core_ref(q, k, v, head_z, mask, scale, dropout_p, seed, causal)


def _bwd_ref(grad, q, k, v, head_z, mask, out, lse, scale, dropout_p, seed, causal=False):
    """Explicit PyTorch backward (autograd is not available inside a custom op's kernel)."""
    Bsz, H, S, _ = q.shape
    Hkv = k.shape[1]
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qa, ka, va, g = q.to(acc), repeat_kv(k, H).to(acc), repeat_kv(v, H).to(acc), grad.to(acc)
    scores = torch.matmul(qa, ka.transpose(-1, -2)) * scale
    keep_m = attention_keep(mask, S, causal, q.device)
    if keep_m is not None:
        scores = scores.masked_fill(~keep_m, float("-inf"))
    lse_r = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isneginf(lse_r), torch.full_like(lse_r, float("inf")), lse_r))
    keep = None
    if dropout_p > 0.0:
        keep = dropout_keep(seed, Bsz, H, S, dropout_p).to(acc) / (1.0 - dropout_p)
    pd = p * keep if keep is not None else p
    if head_z is not None:
        z = head_z.to(acc)
        z = torch.where(z != 0, z, torch.zeros_like(z))[None, :, None, None]
        g_eff = g * z
    else:
        g_eff = g
    dv = torch.matmul(pd.transpose(-1, -2), g_eff)
    dp = torch.matmul(g_eff, va.transpose(-1, -2))
    if keep is not None:
        dp = dp * keep
    di = (dp * p).sum(-1, keepdim=True)
    ds = p * (dp - di) * scale
    dq = torch.matmul(ds, ka)
    dk = torch.matmul(ds.transpose(-1, -2), qa)
    if Hkv not in (H, 0):  # sum over each K/V group's query heads
        dk = dk.reshape(Bsz, Hkv, H // Hkv, S, -1).sum(2)
        dv = dv.reshape(Bsz, Hkv, H // Hkv, S, -1).sum(2)
    if head_z is not None:
        o = torch.matmul(pd, va)
        dz = (g * o).sum(dim=(0, 2, 3))
        dz = torch.where(head_z != 0, dz, torch.zeros_like(dz)).to(head_z.dtype)
    else:
        dz = q.new_empty(0)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dz


B.register(OP, B.BackendImpl("reference", _ref_reasons, _fwd_ref, _bwd_ref))
B.register(OP, B.BackendImpl(
    "native", _native_reasons,
    lambda *a: tuple(torch.ops.cofi.masked_attention_fwd_native(*a)),
    lambda *a: tuple(torch.ops.cofi.masked_attention_bwd_native(*a))))
B.register(OP, B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().masked_attention_fwd_triton(*a),
    lambda *a: _triton().masked_attention_bwd_triton(*a)))


# ============================== registered ops ====================================================

def _rows(t: torch.Tensor) -> torch.Tensor:
    """q, k or v [B, H, S, D] as the kernels read it: a unit stride on D and distinct rows (row stride
    >= D, the leading dimension BLAS requires). Packed QKV views and any batch / head strides pass
    through; expanded (stride 0) or overlapping (unfold, as_strided) rows are copied."""
    S, D = t.shape[-2], t.shape[-1]
    unit_last = D <= 1 or t.stride(-1) == 1
    rows_ok = S <= 1 or t.stride(-2) >= max(D, 1)
    return t if unit_last and rows_ok else t.contiguous()


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype


@torch.library.custom_op("cofi::masked_attention", mutates_args=())
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_z: torch.Tensor | None,
             key_padding_mask: torch.Tensor | None, scale: float, dropout_p: float, seed: torch.Tensor | None,
             backend: str, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
    z = head_z.contiguous() if head_z is not None else None
    return B.run(OP, backend, "fwd", _rows(q), _rows(k), _rows(v), z, mask, scale, dropout_p, seed, causal)


@_attn_op.register_fake
def _(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed, backend, causal=False):
    torch._check(k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:],
                 lambda: "k and v must be [B, Hkv, S, D] with q's B, S, D")
    Bsz, H, S, D = q.shape
    return q.new_empty((Bsz, H, S, D)), q.new_empty((Bsz, H, S), dtype=_lse_dtype(q))


@torch.library.custom_op("cofi::masked_attention_backward", mutates_args=())
def _attn_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 head_z: torch.Tensor | None, key_padding_mask: torch.Tensor | None, out: torch.Tensor,
                 lse: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
                 backend: str, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
    z = head_z.contiguous() if head_z is not None else None
    dq, dk, dv, dz = B.run(OP, backend, "bwd", grad.contiguous(), _rows(q), _rows(k), _rows(v), z, mask,
                           out.contiguous(), lse.contiguous(), scale, dropout_p, seed, causal)
    return dq, dk, dv, dz


@_attn_bwd_op.register_fake
def _(grad, q, k, v, head_z, key_padding_mask, out, lse, scale, dropout_p, seed, backend, causal=False):
    dz = torch.empty_like(head_z, memory_format=torch.contiguous_format) if head_z is not None else q.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape), dz)


def _attn_setup(ctx, inputs, output):
    q, k, v, head_z, mask, scale, dropout_p, seed, backend, causal = inputs
    out, lse = output
    ctx.has_z = head_z is not None
    ctx.save_for_backward(q, k, v, head_z, mask, seed, out, lse)
    ctx.args = (scale, dropout_p, backend, causal)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, head_z, mask, seed, out, lse = ctx.saved_tensors
    scale, dropout_p, backend, causal = ctx.args
    if grad_out is None or not any(ctx.needs_input_grad[:4]):
        return None, None, None, None, None, None, None, None, None, None
    dq, dk, dv, dz = torch.ops.cofi.masked_attention_backward(grad_out, q, k, v, head_z, mask, out, lse, scale,
                                                              dropout_p, seed, backend, causal)
    n = ctx.needs_input_grad
    return (dq if n[0] else None, dk if n[1] else None, dv if n[2] else None,
            dz if (n[3] and ctx.has_z) else None, None, None, None, None, None, None)


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup)


# ============================== public API ========================================================

def _validate(q, k, v, head_z, key_padding_mask, scale, dropout_p, generator, causal, kv_z):
    check_tensor(OP, "q", q, ndim=4)
    Bsz, H, S, D = q.shape
    check_tensor(OP, "k", k, ndim=4, like=q, like_name="q")
    Hkv = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (Bsz, S, D):
        raise UserError(f"cofi.ops.{OP}: k must have shape [B, Hkv, S, D] with q's B, S, D = {(Bsz, S, D)}, "
                        f"got {tuple(k.shape)}")
    if (H % Hkv != 0) if Hkv else H != 0:
        raise UserError(f"cofi.ops.{OP}: k's head count (n_kv_heads) must divide q's head count {H}, got {Hkv}")
    check_tensor(OP, "v", v, ndim=4, like=q, like_name="q")
    if tuple(v.shape) != tuple(k.shape):
        raise UserError(f"cofi.ops.{OP}: v must have k's shape [B, Hkv, S, D] = {tuple(k.shape)}, got {tuple(v.shape)}")
    if not isinstance(causal, bool):
        raise UserError(f"cofi.ops.{OP}: causal must be a bool, got {type(causal).__name__} {causal!r}")
    if kv_z is not None:
        check_tensor(OP, "kv_z", kv_z, shape=(Hkv,), dtypes=FLOAT_DTYPES)
        if kv_z.device != q.device:
            raise UserError(f"cofi.ops.{OP}: kv_z is on {kv_z.device} but q is on {q.device}")
    if head_z is not None:
        check_tensor(OP, "head_z", head_z, shape=(H,), dtypes=FLOAT_DTYPES)
        if head_z.device != q.device:
            raise ValueError(f"cofi.ops.{OP}: head_z is on {head_z.device} but q is on {q.device}")
    if key_padding_mask is not None:
        check_tensor(OP, "key_padding_mask", key_padding_mask, shape=(Bsz, S),
                     dtypes=(torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64))
        if key_padding_mask.device != q.device:
            raise ValueError(f"cofi.ops.{OP}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if scale is not None:
        s = check_float(OP, "scale", scale)
        if math.isinf(s):
            raise ValueError(f"cofi.ops.{OP}: scale must be finite, got {s}")
    check_float(OP, "dropout_p", dropout_p, 0.0)
    if not dropout_p < 1.0:
        raise ValueError(f"cofi.ops.{OP}: dropout_p must be in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"cofi.ops.{OP}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_z: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    *,
    causal: bool = False,
    kv_z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated multi-head or grouped-query attention; returns out [B, H, S, D] (contiguous).

    q: [B, H, S, D]; k, v: [B, Hkv, S, D] with Hkv dividing H (Hkv = H: multi-head attention; query
    head h uses K/V head h // (H / Hkv)); same dtype/device (strided views with a unit last-dim
    stride, such as ``k_proj(x).view(B, S, Hkv, D).transpose(1, 2)``, are used without a copy).
    head_z: [H] gates on query heads (any float dtype, cast to q's) or None; kv_z: [Hkv] gates on
    K/V groups or None (query head h is gated by head_z[h] * kv_z[h // (H / Hkv)]); heads with a
    gate of exactly 0 are skipped (zero output and zero gradients), a group with kv_z = 0 is not
    read at all. causal: query i attends to keys j <= i only (with the padding mask if both). key_padding_mask: [B, S], True / nonzero
    = keep (transformers' attention_mask); a query whose keys are all masked gives 0, never NaN.
    scale: default 1/sqrt(D). dropout_p in [0, 1) on the attention probabilities, seeded from
    ``generator`` (reproducible across backends; the ``sdpa`` backend refuses dropout).
    Differentiable in q, k, v, head_z and kv_z (first order only: double backward is not supported, except
    through the ``sdpa`` backend, which is plain torch code).
    """
    _validate(q, k, v, head_z, key_padding_mask, scale, dropout_p, generator, causal, kv_z)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if head_z is not None and head_z.dtype != q.dtype:
        head_z = head_z.to(q.dtype)
    if kv_z is not None:
        zg = repeat_kv(kv_z.to(q.dtype)[None, :, None, None], q.shape[1]).reshape(q.shape[1])
        head_z = zg if head_z is None else head_z * zg
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    chosen = B.choice(backend)
    impl = B.composite(OP, chosen, q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p), causal)
    if impl is not None:
        if not torch.compiler.is_compiling():  # a compiled graph holds the torch ops themselves
            B.record(OP, impl.name, q.device)
        return impl.fwd(q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p), causal).contiguous()
    seed = dropout_seed(generator, q.device) if dropout_p > 0.0 else None
    out, _ = torch.ops.cofi.masked_attention(q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p),
                                             seed, chosen, causal)
    return out


def masked_attention_packed(
    qkv: torch.Tensor,
    head_z: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """``masked_attention`` on a fused projection's output qkv [B, S, 3, H, D] (no copy of q, k, v;
    multi-head only: grouped-query K/V have their own shapes, pass them to ``masked_attention``).

    Returns out [B, H, S, D].
    """
    check_tensor(OP, "qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"cofi.ops.{OP}: qkv must have shape [B, S, 3, H, D], got {tuple(qkv.shape)}")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return masked_attention(q, k, v, head_z, key_padding_mask, scale, dropout_p, generator, backend, causal=causal)


# ============================== native fakes ======================================================

if _ext.native_loaded():
    try:
        @torch.library.register_fake("cofi::masked_attention_fwd_native")
        def _(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed, causal=False):
            Bsz, H, S, D = q.shape
            return q.new_empty((Bsz, H, S, D)), q.new_empty((Bsz, H, S), dtype=_lse_dtype(q))

        @torch.library.register_fake("cofi::masked_attention_bwd_native")
        def _(grad, q, k, v, head_z, key_padding_mask, out, lse, scale, dropout_p, seed, causal=False):
            dz = torch.empty_like(head_z, memory_format=torch.contiguous_format) if head_z is not None else q.new_empty(0)
            return q.new_empty(q.shape), k.new_empty(k.shape), k.new_empty(k.shape), dz
    except RuntimeError:  # pragma: no cover - extension built before this op's schemas existed
        pass


__all__ = ["masked_attention", "masked_attention_packed"]
