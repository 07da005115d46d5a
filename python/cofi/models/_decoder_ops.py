"""Decoder compute steps in plain torch: rotary embedding (transformers' own classes), causal
grouped-query attention over gathered heads on SDPA, SwiGLU MLP. The masked decoder's training
forward (``cofi.models.llama``) uses the rotary parts and runs attention / MLP on cofi's fused ops;
the compact inference model (``cofi.runtime.compact_llama``) runs all of these.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

_ROTARY = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


def rotary_embedding(config) -> torch.nn.Module:
    """transformers' own rotary class for the config's model_type (default, llama3, yarn, ... RoPE
    exactly as transformers computes cos / sin): module(x, position_ids [B, S]) -> (cos, sin) [B, S, D]."""
    mt = config.model_type
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    return getattr(mod, f"{_ROTARY[mt]}RotaryEmbedding")(config=config)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, S, D]; cos, sin [B, S, D]. transformers' apply_rotary_pos_emb, same operation order."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rot * sin)


def causal_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """bool [B, 1, S, S] (True = attend): causal and key not padding; None = plain causal. A query
    row with no visible key (left padding) sees its causal row instead of nothing (its output is
    padding; SDPA would give NaN)."""
    if attention_mask is None:
        return None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
    m = causal[None, None] & attention_mask.to(torch.bool)[:, None, None, :]
    return m | (~m.any(-1, keepdim=True) & causal)


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_to_kv: torch.Tensor | None,
                         uniform: bool, mask: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    """Causal attention of q [B, hq, S, D] over k, v [B, hk, S, D]; query head i reads K/V head
    q_to_kv[i] (int64 [hq]); ``uniform``: q_to_kv is arange(hk).repeat_interleave(hq / hk) (SDPA's
    enable_gqa, no copy of K/V). mask: ``causal_mask``'s or None. Returns [B, hq, S, D]."""
    hq, hk = q.shape[1], k.shape[1]
    gqa = False
    if hq != hk or not uniform:
        if uniform:
            gqa = True
        else:
            k, v = k.index_select(1, q_to_kv), v.index_select(1, q_to_kv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                          scale=scale, enable_gqa=gqa)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
           b_up: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None,
           unit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """down((silu(gate(x)) * up(x)) * unit_scale): x [..., d]; w_gate, w_up [f, d]; w_down [d_out, f];
    unit_scale [f] or None. Returns [..., d_out]."""
    h = F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)
    if unit_scale is not None:
        h = h * unit_scale
    return F.linear(h, w_down, b_down)
