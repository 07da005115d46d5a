"""The compact (ragged) Llama-family causal LM a fold produces: per layer its own query-head, K/V-head
and SwiGLU-unit counts (ragged query heads per K/V group too), a reduced hidden size, sublayers that
are gone cost nothing. Parameter names are transformers' (``model.layers.{i}.self_attn.q_proj`` ...),
so a model whose structure is uniform (``stock_config``) loads into transformers' own class.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..masks.decoder import DecoderShape
from ..models import _decoder_ops as ops
from ..vocab import decoder_attention_params, decoder_embedding_params, decoder_mlp_params


@dataclass
class CompactLlamaConfig:
    """Structure of a folded decoder. ``base``: the original transformers config (dict; RoPE, eps,
    vocabulary). Per layer: q_heads / kv_heads (kept original head and K/V-group indices), q_to_kv
    (each kept query head's position among the kept groups), attention / mlp (sublayer present),
    intermediate_sizes. hidden_index: kept hidden dims of the original model."""

    base: dict[str, Any]
    hidden_index: list[int]
    q_heads: list[list[int]]
    kv_heads: list[list[int]]
    q_to_kv: list[list[int]]
    attention: list[bool]
    intermediate_sizes: list[int]
    mlp: list[bool]
    head_dim: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @property
    def hidden_size(self) -> int:
        return len(self.hidden_index)

    @property
    def num_layers(self) -> int:
        return len(self.q_heads)

    def hf_config(self, **overrides: Any):
        """The base transformers config (overrides applied)."""
        from transformers import AutoConfig

        d = {k: v for k, v in self.base.items() if k not in ("model_type", "transformers_version")}
        d.update(overrides)
        return AutoConfig.for_model(self.base["model_type"], **d)

    def stock_layers(self) -> list[int]:
        """Indices of the layers a stock model holds: every layer that keeps a sublayer. A layer with
        both sublayers removed is the identity of the pre-norm residual stream and is left out; a
        layer with exactly one removed has no stock form (UserError naming it)."""
        for i, (a, m) in enumerate(zip(self.attention, self.mlp)):
            if a != m:
                raise UserError(f"cofi.runtime.compact_llama: stock export needs both sublayers or neither in every "
                                f"layer; layer {i} keeps only its {'attention' if a else 'MLP'}")
        return [i for i, a in enumerate(self.attention) if a]

    def stock_config(self):
        """A transformers config of the same class whose stock model holds exactly these weights
        (``stock_layers()`` renumbered 0..n-1, see ``CompactLlamaForCausalLM.stock_state_dict``), or a
        UserError naming what is not uniform (transformers needs every layer to keep both sublayers,
        the same query / K/V head counts with equal query heads per group, and the same FFN width)."""
        keep = self.stock_layers()
        nq = {len(self.q_heads[i]) for i in keep}
        nk = {len(self.kv_heads[i]) for i in keep}
        nf = {self.intermediate_sizes[i] for i in keep}
        if len(nq) != 1 or len(nk) != 1 or len(nf) != 1 or 0 in nq | nf:
            raise UserError("cofi.runtime.compact_llama: stock export needs equal nonzero counts in every kept layer, "
                            f"got query heads {sorted(nq)}, K/V heads {sorted(nk)}, intermediate {sorted(nf)}")
        (q,), (k,), (f,) = nq, nk, nf
        for i in keep:
            m = self.q_to_kv[i]
            if q % k or m != [j // (q // k) for j in range(q)]:
                raise UserError(f"cofi.runtime.compact_llama: stock export needs equal query heads per K/V group; "
                                f"layer {i} maps its query heads to groups {m}")
        extra = {}
        if isinstance(self.base.get("layer_types"), list):  # per-layer attention kinds (Qwen2): the kept ones
            extra["layer_types"] = [self.base["layer_types"][i] for i in keep]
        return self.hf_config(hidden_size=self.hidden_size, num_attention_heads=q, num_key_value_heads=k,
                              intermediate_size=f, head_dim=self.head_dim, num_hidden_layers=len(keep),
                              tie_word_embeddings=self.tie_word_embeddings, **extra)

    def num_parameters(self) -> dict[str, int]:
        """body (layers + final norm), embedding, lm_head (0 when tied), total: cofi.vocab's formulas."""
        d, D = self.hidden_size, self.head_dim
        body = d
        for q, k, a, f, m in zip(self.q_heads, self.kv_heads, self.attention, self.intermediate_sizes, self.mlp):
            if a:
                body += decoder_attention_params(d, len(q), len(k), D, self.qkv_bias, self.o_bias, norm=int(bool(q)))
            if m:
                body += decoder_mlp_params(d, f, self.mlp_bias, norm=int(bool(f)))
        emb, head = decoder_embedding_params(int(self.base["vocab_size"]), d, self.tie_word_embeddings)
        return {"body": body, "embedding": emb, "lm_head": head, "total": body + emb + head}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CompactLlamaConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise UserError(f"cofi.runtime.compact_llama: config must have the fields {sorted(names)}, "
                            f"missing {sorted(names - set(d))}, unexpected {sorted(set(d) - names)}")
        return cls(**d)


def _linear(i: int, o: int, bias: bool) -> nn.Linear:
    return nn.Linear(i, o, bias=bias)


class _Norm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class _Attention(nn.Module):
    def __init__(self, c: CompactLlamaConfig, i: int) -> None:
        super().__init__()
        d, D, q, k = c.hidden_size, c.head_dim, len(c.q_heads[i]), len(c.kv_heads[i])
        self.nq, self.nk = q, k
        if q:
            self.q_proj = _linear(d, q * D, c.qkv_bias)
            self.k_proj = _linear(d, k * D, c.qkv_bias)
            self.v_proj = _linear(d, k * D, c.qkv_bias)
        self.o_proj = _linear(q * D, d, c.o_bias)  # q = 0: the bias alone
        m = c.q_to_kv[i]
        self.uniform = k > 0 and q % k == 0 and m == [j // (q // k) for j in range(q)]
        self.register_buffer("q_to_kv", torch.tensor(m, dtype=torch.int64), persistent=False)


class _MLP(nn.Module):
    def __init__(self, c: CompactLlamaConfig, i: int) -> None:
        super().__init__()
        d, f = c.hidden_size, c.intermediate_sizes[i]
        self.width = f
        if f:
            self.gate_proj = _linear(d, f, c.mlp_bias)
            self.up_proj = _linear(d, f, c.mlp_bias)
        self.down_proj = _linear(f, d, c.mlp_bias)


class _Layer(nn.Module):
    def __init__(self, c: CompactLlamaConfig, i: int) -> None:
        super().__init__()
        d = c.hidden_size
        self.self_attn = _Attention(c, i) if c.attention[i] else None
        self.input_layernorm = _Norm(d) if c.attention[i] and c.q_heads[i] else None
        self.mlp = _MLP(c, i) if c.mlp[i] else None
        self.post_attention_layernorm = _Norm(d) if c.mlp[i] and c.intermediate_sizes[i] else None


class _Body(nn.Module):
    def __init__(self, c: CompactLlamaConfig) -> None:
        super().__init__()
        base = c.hf_config()
        self.embed_tokens = nn.Embedding(int(base.vocab_size), c.hidden_size)
        self.layers = nn.ModuleList(_Layer(c, i) for i in range(c.num_layers))
        self.norm = _Norm(c.hidden_size)
        self.rotary_emb = ops.rotary_embedding(base)


class CompactLlamaForCausalLM(nn.Module):
    """Inference model of a folded decoder: forward(input_ids [B, S], attention_mask [B, S] | None)
    -> logits [B, S, V]. No dropout."""

    def __init__(self, config: CompactLlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, int(config.base["vocab_size"]), bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.base_shape = DecoderShape.from_hf_config(config.hf_config())
        self.eps = self.base_shape.rms_norm_eps

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, S = input_ids.shape
        self.base_shape.check_length(S)
        r = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(r, torch.arange(S, device=input_ids.device)[None].expand(B, S))
        mask = ops.causal_mask(attention_mask, S)
        d, D = self.config.hidden_size, self.config.head_dim
        for layer in self.model.layers:
            a = layer.self_attn
            if a is not None:
                if a.nq == 0:
                    r = r + a.o_proj.bias
                else:
                    y = F.rms_norm(r, (d,), layer.input_layernorm.weight, self.eps)
                    q = ops.apply_rope(a.q_proj(y).view(B, S, a.nq, D).transpose(1, 2), cos, sin)
                    k = ops.apply_rope(a.k_proj(y).view(B, S, a.nk, D).transpose(1, 2), cos, sin)
                    v = a.v_proj(y).view(B, S, a.nk, D).transpose(1, 2)
                    ctx = ops.causal_gqa_attention(q, k, v, a.q_to_kv, a.uniform, mask, 0.0, D ** -0.5)
                    r = r + a.o_proj(ctx.transpose(1, 2).reshape(B, S, a.nq * D))
            m = layer.mlp
            if m is not None:
                if m.width == 0:
                    r = r + m.down_proj.bias
                else:
                    y = F.rms_norm(r, (d,), layer.post_attention_layernorm.weight, self.eps)
                    r = r + ops.swiglu(y, m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias,
                                       m.down_proj.weight, m.down_proj.bias)
        return self.lm_head(F.rms_norm(r, (d,), self.model.norm.weight, self.eps))

    def stock_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under a stock model's names: the ``config.stock_layers()`` renumbered 0..n-1
        (a tied LM head left out, stored once as the embedding)."""
        new = {old: n for n, old in enumerate(self.config.stock_layers())}
        out = {}
        for k, v in self.state_dict().items():
            if self.config.tie_word_embeddings and k == "lm_head.weight":
                continue
            if k.startswith("model.layers."):
                i, rest = k.removeprefix("model.layers.").split(".", 1)
                k = f"model.layers.{new[int(i)]}.{rest}"
            out[k] = v.detach().contiguous().cpu()
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """cofi_llama.json + model.safetensors into a new folder (an existing one is refused)."""
        from safetensors.torch import save_file

        out = Path(folder)
        if out.exists():
            raise UserError(f"cofi.runtime.compact_llama: folder must not exist yet (never overwritten), got {out}")
        out.mkdir(parents=True)
        (out / "cofi_llama.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
              if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> CompactLlamaForCausalLM:
        from safetensors.torch import load_file

        f = Path(folder)
        if not (f / "cofi_llama.json").is_file():
            raise UserError(f"cofi.runtime.compact_llama: folder must hold cofi_llama.json, got {f}")
        model = cls(CompactLlamaConfig.from_dict(json.loads((f / "cofi_llama.json").read_text())))
        sd = load_file(str(f / "model.safetensors"))
        model.to(next(iter(sd.values())).dtype)
        missing, extra = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or extra:
            raise UserError(f"cofi.runtime.compact_llama: {f}/model.safetensors lacks {missing[:3]} / has unexpected "
                            f"{extra[:3]}")
        return model.eval()


__all__ = ["CompactLlamaConfig", "CompactLlamaForCausalLM"]
