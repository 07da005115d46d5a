"""Fused multi-head attention with per-head gates: ``cofi.ops.masked_attention``.

out[:, h] = head_z[h] * softmax(q_h k_h^T * scale + padding) v_h, with q, k, v of shape [B, H, S, D]
(H may be 0 and may change from call to call). Heads whose gate is exactly 0 are not computed: the
kernels build the live-head index list once per call and run only those heads; dead heads get
out = 0, lse = +inf, and zero gradients (d head_z included, see ``masked_attention_core_ref``).

Registered ops:

- ``cofi::masked_attention(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed, backend)
  -> (out, lse)``: lse [B, H, S] is the per-row log-sum-exp the backward needs (no [S, S] tensor is
  kept); float32 for half inputs.
- ``cofi::masked_attention_backward(grad, q, k, v, head_z, key_padding_mask, out, lse, scale,
  dropout_p, seed, backend) -> (dq, dk, dv, d_head_z)``; d_head_z is an empty tensor when head_z
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
from . import _backends as B
from ._validate import FLOAT_DTYPES, check_float, check_tensor
from . import masked_attention_sdpa  # noqa: F401  registers the composite 'sdpa' backend
from .reference.masked_attention import dropout_keep, dropout_seed, masked_attention_core_ref

OP = "masked_attention"
# CPU native computes float16 / bfloat16 in float (csrc/masked_attention/masked_attention_cpu.cpp).
_NATIVE_DTYPES = {"cpu": FLOAT_DTYPES,
                  "cuda": (torch.float16, torch.bfloat16, torch.float32)}
_TRITON_DTYPES = {"cpu": FLOAT_DTYPES,
                  "cuda": (torch.float16, torch.bfloat16, torch.float32)}
_REF_DTYPES = {"cpu": FLOAT_DTYPES, "cuda": FLOAT_DTYPES}
CUDA_MAX_D = 128  # the CUDA kernel keeps one query row's head_dim in registers


def _native_reasons(q: torch.Tensor, *rest: object) -> list[str]:
    why = B.native_reasons(q.device, "masked_attention_fwd_native") + B.dtype_reasons("q", q, _NATIVE_DTYPES)
    if q.device.type == "cuda" and q.shape[-1] > CUDA_MAX_D:
        why.append(f"head dim {q.shape[-1]} > {CUDA_MAX_D} not supported by the CUDA kernel")
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

def _fwd_ref(q, k, v, head_z, mask, scale, dropout_p, seed):
    return masked_attention_core_ref(q, k, v, head_z, mask, scale, dropout_p, seed)


def _bwd_ref(grad, q, k, v, head_z, mask, out, lse, scale, dropout_p, seed):
    """Explicit PyTorch backward (autograd is not available inside a custom op's kernel)."""
    Bsz, H, S, _ = q.shape
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qa, ka, va, g = q.to(acc), k.to(acc), v.to(acc), grad.to(acc)
    scores = torch.matmul(qa, ka.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].to(torch.bool), float("-inf"))
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
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
    z = head_z.contiguous() if head_z is not None else None
    return B.run(OP, backend, "fwd", _rows(q), _rows(k), _rows(v), z, mask, scale, dropout_p, seed)


@_attn_op.register_fake
def _(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed, backend):
    torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "q, k, v must have the same shape")
    Bsz, H, S, D = q.shape
    return q.new_empty((Bsz, H, S, D)), q.new_empty((Bsz, H, S), dtype=_lse_dtype(q))


@torch.library.custom_op("cofi::masked_attention_backward", mutates_args=())
def _attn_bwd_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 head_z: torch.Tensor | None, key_padding_mask: torch.Tensor | None, out: torch.Tensor,
                 lse: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
    z = head_z.contiguous() if head_z is not None else None
    dq, dk, dv, dz = B.run(OP, backend, "bwd", grad.contiguous(), _rows(q), _rows(k), _rows(v), z, mask,
                           out.contiguous(), lse.contiguous(), scale, dropout_p, seed)
    return dq, dk, dv, dz


@_attn_bwd_op.register_fake
def _(grad, q, k, v, head_z, key_padding_mask, out, lse, scale, dropout_p, seed, backend):
    dz = torch.empty_like(head_z, memory_format=torch.contiguous_format) if head_z is not None else q.new_empty(0)
    return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dz)


def _attn_setup(ctx, inputs, output):
    q, k, v, head_z, mask, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.has_z = head_z is not None
    ctx.save_for_backward(q, k, v, head_z, mask, seed, out, lse)
    ctx.args = (scale, dropout_p, backend)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, head_z, mask, seed, out, lse = ctx.saved_tensors
    scale, dropout_p, backend = ctx.args
    if grad_out is None or not any(ctx.needs_input_grad[:4]):
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv, dz = torch.ops.cofi.masked_attention_backward(grad_out, q, k, v, head_z, mask, out, lse, scale,
                                                              dropout_p, seed, backend)
    n = ctx.needs_input_grad
    return (dq if n[0] else None, dk if n[1] else None, dv if n[2] else None,
            dz if (n[3] and ctx.has_z) else None, None, None, None, None, None)


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup)


# ============================== public API ========================================================

def _validate(q, k, v, head_z, key_padding_mask, scale, dropout_p, generator):
    check_tensor(OP, "q", q, ndim=4)
    Bsz, H, S, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=4, like=q, like_name="q")
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"cofi.ops.{OP}: {name} must have q's shape [B, H, S, D] = {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
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
) -> torch.Tensor:
    """Gated multi-head attention; returns out [B, H, S, D] (contiguous).

    q, k, v: [B, H, S, D], same dtype/device (strided views with a unit last-dim stride are used
    without a copy). head_z: [H] gates (any float dtype, cast to q's) or None; heads with a gate of
    exactly 0 are skipped (zero output and zero gradients). key_padding_mask: [B, S], True / nonzero
    = keep (transformers' attention_mask); a query whose keys are all masked gives 0, never NaN.
    scale: default 1/sqrt(D). dropout_p in [0, 1) on the attention probabilities, seeded from
    ``generator`` (reproducible across backends; the ``sdpa`` backend refuses dropout).
    Differentiable in q, k, v and head_z (first order only: double backward is not supported, except
    through the ``sdpa`` backend, which is plain torch code).
    """
    _validate(q, k, v, head_z, key_padding_mask, scale, dropout_p, generator)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if head_z is not None and head_z.dtype != q.dtype:
        head_z = head_z.to(q.dtype)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    chosen = B.choice(backend)
    impl = B.composite(OP, chosen, q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p))
    if impl is not None:
        if not torch.compiler.is_compiling():  # a compiled graph holds the torch ops themselves
            B.record(OP, impl.name, q.device)
        return impl.fwd(q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p)).contiguous()
    seed = dropout_seed(generator, q.device) if dropout_p > 0.0 else None
    out, _ = torch.ops.cofi.masked_attention(q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p),
                                             seed, chosen)
    return out


def masked_attention_packed(
    qkv: torch.Tensor,
    head_z: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``masked_attention`` on a fused projection's output qkv [B, S, 3, H, D] (no copy of q, k, v).

    Returns out [B, H, S, D].
    """
    check_tensor(OP, "qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"cofi.ops.{OP}: qkv must have shape [B, S, 3, H, D], got {tuple(qkv.shape)}")
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return masked_attention(q, k, v, head_z, key_padding_mask, scale, dropout_p, generator, backend)


# ============================== native fakes ======================================================

if _ext.native_loaded():
    try:
        @torch.library.register_fake("cofi::masked_attention_fwd_native")
        def _(q, k, v, head_z, key_padding_mask, scale, dropout_p, seed):
            Bsz, H, S, D = q.shape
            return q.new_empty((Bsz, H, S, D)), q.new_empty((Bsz, H, S), dtype=_lse_dtype(q))

        @torch.library.register_fake("cofi::masked_attention_bwd_native")
        def _(grad, q, k, v, head_z, key_padding_mask, out, lse, scale, dropout_p, seed):
            dz = torch.empty_like(head_z, memory_format=torch.contiguous_format) if head_z is not None else q.new_empty(0)
            return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dz
    except RuntimeError:  # pragma: no cover - extension built before this op's schemas existed
        pass


__all__ = ["masked_attention", "masked_attention_packed"]
