"""A CoFi compact (structurally pruned, non-uniform) Llama-family causal LM for plain transformers.

Copied next to the weights of every non-uniform decoder folder cofi exports, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads it with torch and transformers only: it must not import cofi. Layer i has its own query heads
``q_heads[i]`` and K/V heads ``kv_heads[i]`` (query head j reads K/V head ``q_to_kv[i][j]``; the
number of query heads per K/V head may differ), ``intermediate_sizes[i]`` SwiGLU units, and
``attention[i]`` / ``mlp[i]`` say whether a sublayer exists (a sublayer with no heads / units adds
its bias only). The hidden size is the kept one; RoPE, RMSNorm eps and the vocabulary are those of
the base model (``base``: its transformers config), RoPE computed by transformers' own rotary class.
Tensor names are transformers' Llama names. Forward computes full sequences (no KV cache): for fast
generation use cofi's runtime (``cofi generate FOLDER``).
"""
from __future__ import annotations

import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

_ROTARY = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}


class CofiLlamaCompactConfig(PretrainedConfig):
    """The compact structure (config.json as cofi writes it). No ``__init__`` of its own: every key
    of config.json becomes an attribute."""

    model_type = "cofi_llama_compact"


def _base_config(config: CofiLlamaCompactConfig) -> PretrainedConfig:
    d = {k: v for k, v in config.base.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(config.base["model_type"], **d)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, S, D]; cos, sin [B, S, D] (transformers' apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class _Norm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class CofiLlamaCompactAttention(nn.Module):
    def __init__(self, config: CofiLlamaCompactConfig, i: int) -> None:
        super().__init__()
        d, D = len(config.hidden_index), config.head_dim
        self.nq, self.nk, self.head_dim = len(config.q_heads[i]), len(config.kv_heads[i]), D
        if self.nq:
            self.q_proj = nn.Linear(d, self.nq * D, bias=config.qkv_bias)
            self.k_proj = nn.Linear(d, self.nk * D, bias=config.qkv_bias)
            self.v_proj = nn.Linear(d, self.nk * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.nq * D, d, bias=config.o_bias)
        self.q_to_kv = list(config.q_to_kv[i])  # a list: transformers leaves non-persistent buffers uninitialised

    def forward(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        B, S, _ = y.shape
        D = self.head_dim
        idx = torch.tensor(self.q_to_kv, dtype=torch.int64, device=y.device)
        q = _rope(self.q_proj(y).view(B, S, self.nq, D).transpose(1, 2), cos, sin)
        k = _rope(self.k_proj(y).view(B, S, self.nk, D).transpose(1, 2), cos, sin).index_select(1, idx)
        v = self.v_proj(y).view(B, S, self.nk, D).transpose(1, 2).index_select(1, idx)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=D ** -0.5)
        return self.o_proj(ctx.transpose(1, 2).reshape(B, S, self.nq * D))


class CofiLlamaCompactMLP(nn.Module):
    def __init__(self, config: CofiLlamaCompactConfig, i: int) -> None:
        super().__init__()
        d, f = len(config.hidden_index), config.intermediate_sizes[i]
        self.width = f
        if f:
            self.gate_proj = nn.Linear(d, f, bias=config.mlp_bias)
            self.up_proj = nn.Linear(d, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=config.mlp_bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class CofiLlamaCompactLayer(nn.Module):
    def __init__(self, config: CofiLlamaCompactConfig, i: int, eps: float) -> None:
        super().__init__()
        d = len(config.hidden_index)
        self.self_attn = CofiLlamaCompactAttention(config, i) if config.attention[i] else None
        self.input_layernorm = _Norm(d, eps) if config.attention[i] and config.q_heads[i] else None
        self.mlp = CofiLlamaCompactMLP(config, i) if config.mlp[i] else None
        self.post_attention_layernorm = _Norm(d, eps) if config.mlp[i] and config.intermediate_sizes[i] else None

    def forward(self, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        if self.self_attn is not None:
            a = self.self_attn
            r = r + (a.o_proj.bias if a.nq == 0 else a(self.input_layernorm(r), cos, sin, mask))
        if self.mlp is not None:
            m = self.mlp
            r = r + (m.down_proj.bias if m.width == 0 else m(self.post_attention_layernorm(r)))
        return r


class CofiLlamaCompactModel(nn.Module):
    def __init__(self, config: CofiLlamaCompactConfig) -> None:
        super().__init__()
        base = _base_config(config)
        d, eps = len(config.hidden_index), float(base.rms_norm_eps)
        self.embed_tokens = nn.Embedding(int(base.vocab_size), d)
        self.layers = nn.ModuleList(CofiLlamaCompactLayer(config, i, eps) for i in range(len(config.q_heads)))
        self.norm = _Norm(d, eps)
        mt = base.model_type
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        self.rotary_emb = getattr(mod, f"{_ROTARY[mt]}RotaryEmbedding")(config=base)


class CofiLlamaCompactForCausalLM(PreTrainedModel):
    """logits [B, S, V]; ``attention_mask`` [B, S] marks padding keys; positions 0..S-1 unless
    ``position_ids`` [B, S] are given (as transformers' Llama forward without a cache)."""

    config_class = CofiLlamaCompactConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["CofiLlamaCompactLayer"]
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CofiLlamaCompactConfig) -> None:
        super().__init__(config)
        self.model = CofiLlamaCompactModel(config)
        self.lm_head = nn.Linear(len(config.hidden_index), int(config.base["vocab_size"]), bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # every weight comes from model.safetensors; only RoPE's non-persistent inv_freq is computed
        if "RotaryEmbedding" in type(module).__name__:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
                ) -> CausalLMOutputWithPast:
        B, S = input_ids.shape
        r = self.model.embed_tokens(input_ids)
        keep = None if attention_mask is None else attention_mask.to(torch.bool)
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)[None].expand(B, S)
        cos, sin = self.model.rotary_emb(r, position_ids)
        mask = None
        if keep is not None and not bool(keep.all()):
            causal = torch.ones(S, S, dtype=torch.bool, device=r.device).tril()
            mask = causal[None, None] & keep[:, None, None, :]
            mask = mask | (~mask.any(-1, keepdim=True) & causal)  # rows with no real key: output unused
        for layer in self.model.layers:
            r = layer(r, cos, sin, mask)
        logits = self.lm_head(self.model.norm(r))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
