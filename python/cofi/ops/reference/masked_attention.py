"""Reference masked multi-head attention (eager PyTorch).

Dropout uses a counter-based hash RNG so every backend draws the *same* mask from the same seed:
the keep decision for (batch b, head h, query i, key j) is ``hash(seed, b * H + h, i, j) >= thr``
with ``thr = min(round(p * 2**32), 2**32 - 1)`` and the 32-bit hash ``dropout_hash`` below. The
seed is two int64 values in [0, 2**31) drawn from a ``torch.Generator`` (``dropout_seed``). The
kernels (C++, CUDA, Triton) compute the identical hash with uint32 arithmetic.
"""
from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x2C1B3C6D


def _mix(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def dropout_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Two int64 seeds in [0, 2**31) from ``generator`` (default generator of ``device`` if None)."""
    if generator is not None:
        s = torch.randint(0, 2**31, (2,), generator=generator, device=generator.device, dtype=torch.int64)
        return s.to(device)
    return torch.randint(0, 2**31, (2,), device=device, dtype=torch.int64)


def dropout_threshold(p: float) -> int:
    """uint32 threshold: an element is kept iff its hash >= threshold."""
    return min(int(round(p * 4294967296.0)), _M32)


def dropout_hash(seed: torch.Tensor, B: int, H: int, S: int, head_idx: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, S, S] int64 hash values in [0, 2**32) (``head_idx`` maps heads to original indices)."""
    dev = seed.device
    s0, s1 = seed[0].to(torch.int64), seed[1].to(torch.int64)
    h = torch.arange(H, device=dev, dtype=torch.int64) if head_idx is None else head_idx.to(torch.int64)
    b = torch.arange(B, device=dev, dtype=torch.int64)
    bh = b[:, None] * H + h[None, :]  # [B, H]
    base = _mix((s0 ^ _mix((bh + s1) & _M32)) & _M32)
    idx = torch.arange(S, device=dev, dtype=torch.int64)
    row = _mix(base[:, :, None] ^ _mix(idx)[None, None, :])  # [B, H, S]
    return _mix((row[..., None] + _mix(idx)[None, None, None, :]) & _M32)


def dropout_keep(seed: torch.Tensor, B: int, H: int, S: int, p: float) -> torch.Tensor:
    """[B, H, S, S] bool keep mask of dropout with probability ``p`` (see module docstring)."""
    return dropout_hash(seed, B, H, S) >= dropout_threshold(p)


def repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """K or V [B, Hkv, S, D] repeated to [B, n_heads, S, D]: K/V head g serves the n_heads / Hkv
    consecutive query heads g * G .. g * G + G - 1 (transformers' ``repeat_kv``); no copy if Hkv = n_heads."""
    hkv = t.shape[1]
    if hkv == n_heads or hkv == 0:
        return t
    return t.repeat_interleave(n_heads // hkv, dim=1)


def attention_keep(key_padding_mask: torch.Tensor | None, S: int, causal: bool,
                   device: torch.device) -> torch.Tensor | None:
    """Bool keep mask broadcastable to the scores [B, H, S, S] (True = query i may see key j), or
    None when every key is visible: padding [B, 1, 1, S] and / or causal (j <= i) [1, 1, S, S]."""
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal:
        tri = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]
        keep = tri if keep is None else keep & tri
    return keep


def masked_attention_core_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_z: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, S, D], lse [B, H, S]) with an explicit dropout seed.

    k, v: [B, Hkv, S, D] with Hkv dividing H (grouped-query attention: query head h reads K/V head
    h // (H / Hkv)). causal: query i sees keys j <= i only (on top of the padding mask).

    lse is the log-sum-exp of each row's scaled, masked scores; +inf for a fully masked row (so
    exp(s - lse) = 0 there). Heads with head_z exactly 0 give out = 0 and zero gradients for every
    input *including head_z* (they are not computed by the kernels; under hard-concrete sampling the
    gate's own derivative is 0 wherever z is exactly 0, so nothing is lost in training).
    """
    Bsz, H, S, _ = q.shape
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # [B, H, S, S]
    keep = attention_keep(key_padding_mask, S, causal, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    probs = torch.exp(scores - lse[..., None])  # exactly 0 for masked keys and fully masked rows
    if dropout_p > 0.0:
        assert seed is not None, "dropout_p > 0 needs a seed"
        kd = dropout_keep(seed, Bsz, H, S, dropout_p)
        probs = probs * kd.to(probs.dtype) / (1.0 - dropout_p)
    out = torch.matmul(probs, v.to(acc))
    if head_z is not None:
        z = head_z.to(acc)[None, :, None, None]
        live = z != 0
        out = torch.where(live, out * z, torch.zeros_like(out))
        lse = torch.where(live[..., 0], lse, torch.full_like(lse, float("inf")))
    return out.to(q.dtype), lse


def masked_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_z: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """out[:, h] = head_z[h] * softmax(q_h k_g^T * scale + padding (+ causal)) v_g, g = h // (H / Hkv).

    q: [B, H, S, D]; k, v: [B, Hkv, S, D] (Hkv divides H); head_z: [H] or None; key_padding_mask:
    [B, S] bool, True = keep; causal: query i sees keys j <= i only.
    A query row whose keys are all masked gives zeros (never NaN). Dropout (probability
    ``dropout_p`` on the attention probabilities) draws its seed from ``generator`` with
    ``dropout_seed`` and the hash mask of the module docstring, so the kernels reproduce it
    exactly from the same generator state. Returns [B, H, S, D].
    """
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    seed = dropout_seed(generator, q.device) if dropout_p > 0.0 else None
    return masked_attention_core_ref(q, k, v, head_z, key_padding_mask, float(scale), float(dropout_p), seed,
                                     causal)[0]
