"""Fold deterministic decoder masks into the weights and cut what is dead: masked Llama -> compact.

Exact for soft values too (docs/decoder.md). The masked model keeps its residual stream r zero outside
the kept hidden dims K, and every write into r is scaled by z[K]; so the compact model stores r[K]:
z[K] goes into the embedding columns, into the rows of o_proj / down_proj (with the layer gate and
the head values head * kv, or the unit values, in the matching columns) and into each RMSNorm weight
(the norm output y = RMSNorm_K(r) w z). q/k/v and gate/up only lose the columns outside K and the
rows of dead heads / groups / units. A tied LM head stays tied: logits = (RMSNorm(r[K]) w_f[K] z[K])
E[:, K]^T = (RMSNorm(r[K]) w_f[K]) (E[:, K] z[K])^T, so the final norm keeps w_f[K] unscaled and the
head reads the folded embedding; an untied head is lm_head[:, K] after a final norm w_f[K] z[K].
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..masks.decoder import DecoderMasks, DecoderShape, effective_heads, kept_structure
from ..runtime.compact_llama import CompactLlamaConfig, CompactLlamaForCausalLM


def _values(masks: DecoderMasks | None, shape: DecoderShape) -> DecoderMasks:
    """Float64 CPU copies, every group present (missing = ones); negative or non-finite refused."""
    out = DecoderMasks.ones(shape, torch.float64)
    for g, t in (masks.items() if masks is not None else ()):
        v = t.detach().to("cpu", torch.float64)
        if tuple(v.shape) != shape.shape(g):
            raise ValueError(f"cofi.pruning: masks.{g} must have shape {shape.shape(g)}, got {tuple(v.shape)}")
        if not torch.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"cofi.pruning: masks.{g} must be finite and >= 0 (deterministic values)")
        setattr(out, g, v)
    return out


class _CastOnStore(dict):
    """A dict that casts each tensor to ``dtype`` (contiguous) when it is stored: the fold computes
    one tensor at a time in float64, and a float64 copy of a whole 1B model would be 10 GB."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, value.to(self.dtype).contiguous())


def fold_llama_state_dict(state_dict: Mapping[str, torch.Tensor], hf_config: Any, masks: DecoderMasks | None,
                          dtype: torch.dtype | None = None) -> tuple[CompactLlamaConfig, dict[str, torch.Tensor]]:
    """Fold + cut a transformers-named *ForCausalLM state dict. Returns the compact config and state
    dict (folded in float64, cast to ``dtype`` or the embedding's dtype)."""
    s = DecoderShape.from_hf_config(hf_config)
    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    z = _values(masks, s)
    hidden, kept = kept_structure(z, s)
    if not hidden:
        raise ValueError("cofi.pruning: masks.hidden prunes every hidden dim; nothing to run")
    K = torch.tensor(hidden, dtype=torch.int64)
    zK = z.hidden[K]
    D = s.head_dim
    hv = effective_heads(z.head, z.kv, s.group_size)
    out_dtype = dtype or sd["model.embed_tokens.weight"].dtype

    def g(name: str) -> torch.Tensor:
        return sd[name].to(torch.float64)

    def rows(idx: list[int]) -> torch.Tensor:
        t = torch.tensor(idx, dtype=torch.int64)
        return (t[:, None] * D + torch.arange(D)[None, :]).reshape(-1)

    tied = s.tie_word_embeddings
    new = _CastOnStore(out_dtype)
    new["model.embed_tokens.weight"] = g("model.embed_tokens.weight")[:, K] * zK
    new["model.norm.weight"] = g("model.norm.weight")[K] * (1.0 if tied else zK)
    for i, k in enumerate(kept):
        P, O = f"model.layers.{i}.", f"model.layers.{i}."
        if k.attention:
            a, gate = P + "self_attn.", z.mha[i]
            Q = rows(k.q_heads)
            if k.q_heads:
                KV = rows(k.kv_heads)
                new[P + "input_layernorm.weight"] = g(P + "input_layernorm.weight")[K] * zK
                for n, r in (("q_proj", Q), ("k_proj", KV), ("v_proj", KV)):
                    new[f"{a}{n}.weight"] = g(f"{a}{n}.weight")[r][:, K]
                    if s.qkv_bias:
                        new[f"{a}{n}.bias"] = g(f"{a}{n}.bias")[r]
            col = hv[i].repeat_interleave(D)[Q]
            new[a + "o_proj.weight"] = g(a + "o_proj.weight")[K][:, Q] * (gate * zK)[:, None] * col[None, :]
            if s.o_bias:
                new[a + "o_proj.bias"] = g(a + "o_proj.bias")[K] * gate * zK
        if k.mlp:
            m, gate = P + "mlp.", z.ffn[i]
            U = torch.tensor(k.units, dtype=torch.int64)
            if k.units:
                new[O + "post_attention_layernorm.weight"] = g(P + "post_attention_layernorm.weight")[K] * zK
                for n in ("gate_proj", "up_proj"):
                    new[f"{m}{n}.weight"] = g(f"{m}{n}.weight")[U][:, K]
                    if s.mlp_bias:
                        new[f"{m}{n}.bias"] = g(f"{m}{n}.bias")[U]
            new[m + "down_proj.weight"] = (g(m + "down_proj.weight")[K][:, U] * (gate * zK)[:, None]
                                           * z.intermediate[i][U][None, :])
            if s.mlp_bias:
                new[m + "down_proj.bias"] = g(m + "down_proj.bias")[K] * gate * zK
    if not tied:
        new["lm_head.weight"] = g("lm_head.weight")[:, K]
    cfg = CompactLlamaConfig(
        base=hf_config.to_dict(), hidden_index=hidden, q_heads=[k.q_heads for k in kept],
        kv_heads=[k.kv_heads for k in kept], q_to_kv=[k.q_to_kv for k in kept],
        attention=[k.attention for k in kept], intermediate_sizes=[len(k.units) for k in kept],
        mlp=[k.mlp for k in kept], head_dim=D, qkv_bias=s.qkv_bias, o_bias=s.o_bias, mlp_bias=s.mlp_bias,
        tie_word_embeddings=tied)
    return cfg, dict(new)


def fold_llama(model: torch.nn.Module, masks: DecoderMasks | None, dtype: torch.dtype | None = None
               ) -> CompactLlamaForCausalLM:
    """The compact model equal to ``model``'s masked forward with deterministic ``masks`` (soft or
    0/1 values). ``model``: a cofi.models.llama or transformers Llama/Qwen2/Mistral causal LM."""
    p = next(model.parameters())
    cfg, new = fold_llama_state_dict(model.state_dict(), model.config, masks, dtype=dtype or p.dtype)
    compact = CompactLlamaForCausalLM(cfg).to(new["model.embed_tokens.weight"].dtype)
    missing, extra = compact.load_state_dict(new, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or extra:
        raise RuntimeError(f"cofi.pruning.fold_llama: compact model missing {missing}, unexpected {extra}")
    return compact.to(p.device).eval()


__all__ = ["fold_llama", "fold_llama_state_dict"]
