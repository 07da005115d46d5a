"""The compact model's encoder in one native call (``cofi::compact_encoder_fwd``, inference only).

The per-op path (``CompactLayer.forward``) makes ~4 custom-op calls per layer, each ~0.1 ms of
Python dispatch: at batch 1 that is a third of a 95 %-sparse BERT-base's latency. The fused op runs
the same native kernels (attention, FFN, LayerNorm) and the same ``addmm`` projections from C++, so
its outputs are the per-op path's to rounding. It is used when all of these hold (``reasons`` lists
the ones that do not): impl ``'cofi'``; no gradient needed; not being traced by torch.compile /
torch.export (they trace the per-op path, whose ops have fake kernels); the backend choice
(``use_backend`` / ``COFI_BACKEND``) is ``auto`` or ``native``; the native kernels can run the input's
device and dtype. ``CompactModel.encoder_path`` forces one path; ``last_encoder_path`` says which ran.
"""
from __future__ import annotations

import functools

import torch

from .. import _ext
from ..ops import _backends as B
from ..ops.masked_attention import _native_reasons as _attention_reasons
from ..ops.masked_ffn import ACT_CODES
from ..ops.masked_ffn import _native_reasons as _ffn_reasons
from ..ops.masked_layer_norm import _native_reasons as _layer_norm_reasons

PATHS = ("auto", "fused", "per_op")
OP = "compact_encoder_fwd"


@functools.lru_cache(maxsize=64)
def _native_reasons_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """Depends only on the build, device, dtype and head dim: cached (checking it every call costs
    ~0.1 ms with cold caches, 1 % of a 95 %-sparse model at batch 1)."""
    if not _ext.has_kernel(OP, "CompositeExplicitAutograd"):
        return (f"cofi::{OP} not in this build of cofi._C (rebuild the extension)",)
    x = torch.empty((0, 0), device=device, dtype=dtype)
    probe = x.new_empty((0, 0, 0, head_dim))
    return tuple(_attention_reasons(probe) + _ffn_reasons(x) + _layer_norm_reasons(x))


def reasons(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Why the fused encoder cannot run ``model`` on the embedding output ``x`` (empty = it can)."""
    why = []
    if model.embeddings.impl != "cofi":
        why.append(f"impl is {model.embeddings.impl!r}, not 'cofi'")
    if torch.compiler.is_compiling():
        why.append("being traced by torch.compile / torch.export")
        return why
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.layers.parameters())):
        why.append("a gradient is needed (no autograd kernel; run under torch.no_grad / inference_mode)")
    chosen = B.choice(None)
    if chosen not in ("auto", "native"):
        why.append(f"backend {chosen!r} forced (use_backend / COFI_BACKEND)")
    return why + list(_native_reasons_for(x.device, x.dtype, model.config.head_dim))


def flat_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[int], list[int], list[int]]:
    """(params, num_heads, widths, present) in the order ``compact_encoder_fwd`` reads them
    (csrc/compact_encoder/compact_encoder_composite.cpp)."""
    params: list[torch.Tensor] = []
    heads, widths, present = [], [], []
    for layer in model.layers:
        a, f = layer.attention, layer.ffn
        bits = 0
        if a is not None:
            bits |= 1
            if a.num_heads:
                params += [a.qkv_weight, a.qkv_bias, a.out_weight]
            params += [a.out_bias, a.ln_weight, a.ln_bias]
        if f is not None:
            bits |= 2
            if f.width:
                params += [f.w1, f.b1, f.w2]
            params += [f.b2, f.ln_weight, f.ln_bias]
        heads.append(a.num_heads if a is not None else 0)
        widths.append(f.width if f is not None else 0)
        present.append(bits)
    return params, heads, widths, present


def embedding_norm(model: torch.nn.Module, e: torch.Tensor) -> torch.Tensor:
    """The embedding LayerNorm of e [B, S, d] by the native kernel, called directly: the public op's
    Python custom-op dispatch (~0.15 ms) is 1 % of a 95 %-sparse model at batch 1. Same kernel and
    arguments as ``CompactEmbeddings.norm`` picks on this path (``reasons`` checked it can run)."""
    emb = model.embeddings
    y = torch.ops.cofi.masked_layer_norm_fwd_native(e.reshape(-1, e.shape[-1]), None, emb.ln_weight, emb.ln_bias,
                                                    emb.hidden_z, float(emb.eps))[0]
    return y.view(e.shape)


def encode(model: torch.nn.Module, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
           all_hidden_states: bool, cls_only: bool = False) -> list[torch.Tensor]:
    """x: [B, S, d] embedding output -> [x, layer outputs...] (all_hidden_states), [last output], or
    with ``cls_only`` [last output at position 0, [B, 1, d]]. With ``model.unpad`` the layers run on
    the real tokens only and outputs are 0 at padding."""
    from .modeling import activation_name

    params, heads, widths, present = flat_params(model)
    hz = model.embeddings.hidden_z
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    out = torch.ops.cofi.compact_encoder_fwd(
        x, kpm, params, heads, widths, present, model.config.head_dim,
        ACT_CODES[activation_name(model.config.hidden_act)], float(model.config.layer_norm_eps), hz,
        all_hidden_states, bool(model.unpad), cls_only)
    B.record("compact_encoder", "native", x.device)
    return [x, *out] if all_hidden_states else list(out)


if _ext.native_loaded():
    try:
        @torch.library.register_fake(f"cofi::{OP}")
        def _(x, key_padding_mask, params, num_heads, widths, present, head_dim, activation, eps, hidden_z,
              all_hidden_states, unpad, cls_only):
            if cls_only:
                return [x.new_empty((x.shape[0], 1, x.shape[2]))]
            n = len(present) if all_hidden_states else 1
            return [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(n)]
    except RuntimeError:  # pragma: no cover - extension built before this op's schema existed
        pass
