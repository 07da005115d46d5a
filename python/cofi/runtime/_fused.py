"""The compact model's embeddings and encoder in two native calls (``cofi::compact_embeddings_fwd``,
``cofi::compact_encoder_fwd``; inference only).

The per-op path (``CompactLayer.forward``) makes ~4 custom-op calls per layer, each ~0.1 ms of
Python dispatch: at batch 1 that is a third of a 95 %-sparse BERT-base's latency; the embedding
step alone is ~6 more calls (~0.5 ms). The fused ops run the same native kernels (attention, FFN,
LayerNorm) and the same ``addmm`` projections from C++, so their outputs are the per-op path's to
rounding. They are used when all of these hold (``reasons`` lists the ones that do not): the model's
backend is not ``'torch'``; no gradient needed; not being traced by torch.compile / torch.export (they trace the
per-op path, whose ops have fake kernels); the backend choice (``use_backend`` / ``COFI_BACKEND``) is
``auto`` or ``native``; the native kernels can run the model's device and dtype; autocast is off
(the fused ops run in the weights' dtype; under autocast the per-op path applies the ops' autocast
policies). A model cast to bf16 / fp16 runs the per-op path on CPU (the native CPU kernels are
fp32 / fp64), whose ops pick a backend that supports the dtype.
``CompactModel.set_backend`` forces one path ('fused' or 'ops'); ``last_backend`` says which ran.
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
from ..vocab import op_activation

OP = "compact_encoder_fwd"
EMBED_OP = "compact_embeddings_fwd"


@functools.lru_cache(maxsize=64)
def _native_reasons_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    """Depends only on the build, device, dtype and head dim: cached (checking it every call costs
    ~0.1 ms with cold caches, 1 % of a 95 %-sparse model at batch 1)."""
    for op in (OP, EMBED_OP):
        if not _ext.has_kernel(op, "CompositeExplicitAutograd"):
            return (f"cofi::{op} not in this build of cofi._C (rebuild the extension)",)
    x = torch.empty((0, 0), device=device, dtype=dtype)
    probe = x.new_empty((0, 0, 0, head_dim))
    return tuple(_attention_reasons(probe) + _ffn_reasons(x) + _layer_norm_reasons(x))


def reasons(model: torch.nn.Module) -> list[str]:
    """Why the fused path cannot run ``model`` now (empty = it can)."""
    why = []
    if model.backend == "torch":
        why.append("backend is 'torch' (plain aten ops)")
    if torch.compiler.is_compiling():
        why.append("being traced by torch.compile / torch.export")
        return why
    if torch.is_grad_enabled() and any(p.requires_grad for m in (model.embeddings, model.layers)
                                       for p in m.parameters()):
        why.append("a gradient is needed (no autograd kernel; run under torch.no_grad / inference_mode)")
    chosen = B.choice(None)
    if chosen not in ("auto", "native"):
        why.append(f"backend {chosen!r} forced (use_backend / COFI_BACKEND)")
    w = model.embeddings.word_embeddings.weight
    if torch.is_autocast_enabled(w.device.type):
        why.append(f"autocast is on for {w.device.type} (the fused encoder runs in the weights' dtype only)")
    return why + list(_native_reasons_for(w.device, w.dtype, model.config.head_dim))


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


def embed(model: torch.nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """input_ids [B, S] -> the embedding output [B, S, d] in one native call (``CompactEmbeddings``'
    lookup and LayerNorm, same order of sums and the same LayerNorm kernel)."""
    emb = model.embeddings
    pos = emb.position_ids(input_ids) if emb.model_type == "roberta" else None
    return torch.ops.cofi.compact_embeddings_fwd(
        input_ids, token_type_ids, pos, emb.word_embeddings.weight, emb.position_embeddings.weight,
        emb.token_type_embeddings.weight, emb.ln_weight, emb.ln_bias, emb.hidden_z, float(emb.eps))


def encode(model: torch.nn.Module, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
           all_hidden_states: bool, cls_only: bool = False) -> list[torch.Tensor]:
    """x: [B, S, d] embedding output -> [x, layer outputs...] (all_hidden_states), [last output], or
    with ``cls_only`` [last output at position 0, [B, 1, d]]. With ``model.unpad`` the layers run on
    the real tokens only and outputs are 0 at padding."""
    params, heads, widths, present = flat_params(model)
    hz = model.embeddings.hidden_z
    kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
    out = torch.ops.cofi.compact_encoder_fwd(
        x, kpm, params, heads, widths, present, model.config.head_dim,
        ACT_CODES[op_activation(model.config.hidden_act, "cofi.runtime")], float(model.config.layer_norm_eps), hz,
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

        @torch.library.register_fake(f"cofi::{EMBED_OP}")
        def _(input_ids, token_type_ids, position_ids, word, position, token_type, ln_weight, ln_bias, hidden_z,
              eps):
            return word.new_empty((*input_ids.shape, word.shape[1]))
    except RuntimeError:  # pragma: no cover - extension built before this op's schema existed
        pass
