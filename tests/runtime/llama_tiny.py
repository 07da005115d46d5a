"""Tiny random Llama-family models for the decoder runtime / export tests: a transformers model
with weights perturbed off their init, cofi's masked model holding the same weights, and masks
that fold to a ragged or a uniform (stock-exportable) compact decoder."""
from __future__ import annotations

import torch
import transformers as T
from cofi.masks.decoder import DecoderMasks, DecoderShape
from cofi.models.llama import CoFiLlamaForCausalLM

V = 101
TINY = {"vocab_size": V, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def pair(kind: str = "llama", dtype: torch.dtype = torch.float64, seed: int = 0, **kw):
    """(transformers model, cofi masked model) with the same weights; kind llama | llama_bias | qwen2."""
    c = {**TINY, **kw}
    if kind == "qwen2":
        cfg = T.Qwen2Config(**c)
    else:
        cfg = T.LlamaConfig(attention_bias=kind == "llama_bias", mlp_bias=kind == "llama_bias", **c)
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.08)
    m = CoFiLlamaForCausalLM(hf.config).to(dtype).eval()
    m.load_hf_state_dict(hf.state_dict())
    return hf, m


def ragged_masks(s: DecoderShape, seed: int = 3, soft: bool = True) -> DecoderMasks:
    """Layer 0: ragged query heads per group (1 and 3), layer 1 no MLP, last layer no attention,
    pruned hidden dims and units; soft values (the fold is exact for them)."""
    g = torch.Generator().manual_seed(seed)
    m = DecoderMasks.ones(s, torch.float64)
    m.head[0, [0, 1]] = 0.0
    m.head[1, 4] = 0.0
    m.hidden[torch.randperm(s.hidden_size, generator=g)[: s.hidden_size // 4]] = 0.0
    m.intermediate[:, ::3] = 0.0
    m.mha[-1], m.ffn[1] = 0.0, 0.0
    if soft:
        for t in (m.hidden, m.head, m.intermediate):
            t.mul_(0.6 + 0.8 * torch.rand(t.shape, generator=g))
    return m


def uniform_masks(s: DecoderShape, heads_per_group: int = 2, units: int = 24, seed: int = 4) -> DecoderMasks:
    """The same number of query heads in every group, K/V heads, units and hidden dims in every
    layer (a stock LlamaConfig holds the fold); soft hidden values."""
    g = torch.Generator().manual_seed(seed)
    m = DecoderMasks.ones(s, torch.float64)
    n = s.group_size
    for layer in range(s.num_layers):
        for grp in range(s.num_kv_heads):
            drop = torch.randperm(n, generator=g)[: n - heads_per_group] + grp * n
            m.head[layer, drop] = 0.0
        m.intermediate[layer, torch.randperm(s.intermediate_size, generator=g)[: s.intermediate_size - units]] = 0.0
    m.hidden[::4] = 0.0
    m.hidden.mul_(0.5 + torch.rand(s.hidden_size, generator=g))
    return m
