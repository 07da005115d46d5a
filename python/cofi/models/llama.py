"""Masked Llama-family causal LM (LlamaForCausalLM, and Qwen2 / Mistral, which share its layout).

Parameter names are transformers' (``model.embed_tokens``, ``model.layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``model.norm``, ``lm_head``), so a checkpoint folder's
safetensors load directly. Masks (``cofi.masks.decoder.DecoderMasks``; semantics in docs/decoder.md),
with z the hidden mask and K its kept dims:

  r_0 = z * embed(ids)
  y   = RMSNorm_K(r) * w * z                     (mean square over K: cofi.ops.masked_add_rms_norm)
  r  += z * g_mha * o_proj((head * kv)[h] * attention_h(y))      (causal, GQA, RoPE as transformers)
  r  += z * g_ffn * down_proj(intermediate * silu(gate_proj(y)) * up_proj(y))
  logits = lm_head(RMSNorm_K(r) * w_final * z)

With every mask 1 (or None) this is transformers' model. Each step gathers the live query heads,
K/V groups and SwiGLU units (one host copy of the masks, ``decoder_plan``) and skips sublayers that
add nothing; the residual stream stays at full width d (pruned dims hold 0).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..masks.decoder import DecoderMasks, DecoderShape, effective_heads
from ..ops import masked_add_rms_norm
from . import _decoder_ops as ops
from .decoder_plan import DecoderPlan, make_decoder_plan


@dataclass
class LlamaOutput:
    """logits [B, S, V] (None when not asked for); hidden_states: (embedding output, each layer's
    output), each the residual stream [B, S, d] before the final norm, or None; plan: the step's
    live-unit plan; last_hidden: the final norm's output [B, S, d] (logits = last_hidden @ lm_head^T)."""

    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    plan: DecoderPlan | None = None
    last_hidden: torch.Tensor | None = None


class _Norm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class _Attention(nn.Module):
    def __init__(self, s: DecoderShape) -> None:
        super().__init__()
        d, D = s.hidden_size, s.head_dim
        self.q_proj = nn.Linear(d, s.num_heads * D, bias=s.qkv_bias)
        self.k_proj = nn.Linear(d, s.num_kv_heads * D, bias=s.qkv_bias)
        self.v_proj = nn.Linear(d, s.num_kv_heads * D, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * D, d, bias=s.o_bias)


class _MLP(nn.Module):
    def __init__(self, s: DecoderShape) -> None:
        super().__init__()
        d, f = s.hidden_size, s.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=s.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=s.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=s.mlp_bias)


class _Layer(nn.Module):
    def __init__(self, s: DecoderShape) -> None:
        super().__init__()
        self.self_attn = _Attention(s)
        self.mlp = _MLP(s)
        self.input_layernorm = _Norm(s.hidden_size)
        self.post_attention_layernorm = _Norm(s.hidden_size)


class _Body(nn.Module):
    def __init__(self, config, s: DecoderShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(_Layer(s) for _ in range(s.num_layers))
        self.norm = _Norm(s.hidden_size)
        self.rotary_emb = ops.rotary_embedding(config)


def _rows(w: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
    return w if idx is None or w is None else w.index_select(0, idx)


def _cols(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return w if idx is None else w.index_select(1, idx)


class CoFiLlamaForCausalLM(nn.Module):
    """A transformers Llama / Qwen2 / Mistral causal LM with CoFi masks (module docstring)."""

    def __init__(self, config, init_weights: bool = True) -> None:
        """config: a transformers LlamaConfig / Qwen2Config / MistralConfig. init_weights: draw
        transformers' initialisation (normal(0, initializer_range)); False when weights are loaded next."""
        super().__init__()
        self.config = config
        self.shape = DecoderShape.from_hf_config(config)
        s = self.shape
        self.model = _Body(config, s)
        self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        std = float(getattr(config, "initializer_range", 0.02))
        for mod in self.modules() if init_weights else ():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, std)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                nn.init.zeros_(mod.bias)
        if s.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                masks: DecoderMasks | None = None, output_hidden_states: bool = False,
                logits: bool = True) -> LlamaOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None; positions are
        0..S-1 as in transformers without a cache. masks: None = the plain model. ``logits=False``:
        stop at the final norm (``last_hidden``), for losses that apply the LM head in chunks."""
        s = self.shape
        B, S = input_ids.shape
        s.check_length(S)
        if masks is not None:
            masks.check(s)
        emb = self.model.embed_tokens(input_ids)
        m = masks.map(lambda t: t.to(emb.dtype)) if masks is not None else DecoderMasks()
        plan = make_decoder_plan(masks, s, input_ids.device)
        z = m.hidden
        keep = None if z is None else (z != 0).to(z.dtype)
        hv = effective_heads(m.head, m.kv, s.group_size)
        cos, sin = self.model.rotary_emb(emb, torch.arange(S, device=input_ids.device)[None].expand(B, S))
        mask = ops.causal_mask(attention_mask, S)
        p_drop = float(getattr(self.config, "attention_dropout", 0.0)) if self.training else 0.0
        eps = s.rms_norm_eps

        pend: torch.Tensor | None = emb if z is None else emb * z  # sublayer output not yet in the stream
        r: torch.Tensor | None = None
        states: list[torch.Tensor] = []

        def flush() -> None:
            nonlocal pend, r
            if pend is not None:
                r = pend if r is None else pend + r
                pend = None
            states.append(r)

        def norm(w: torch.Tensor) -> torch.Tensor:
            nonlocal pend, r
            x, res = (pend, r) if pend is not None else (r, None)
            y, r = masked_add_rms_norm(x, res, w if z is None else w * z, keep, eps)
            pend = None
            return y

        def scale(out: torch.Tensor, gate: torch.Tensor | None, l: int) -> torch.Tensor:
            g = None if gate is None else gate[l]
            f = g if z is None else (z if g is None else g * z)
            return out if f is None else out * f

        if output_hidden_states:
            flush()
        for l, (layer, lp) in enumerate(zip(self.model.layers, plan.layers)):
            if not lp.attn_skip:
                y = norm(layer.input_layernorm.weight)
                a = layer.self_attn
                if lp.n_q == 0:
                    out = a.o_proj.bias.expand(B, S, -1)
                else:
                    out = self._attention(a, y, lp, None if hv is None else hv[l], cos, sin, mask, p_drop)
                pend = scale(out, m.mha, l)
            if not lp.mlp_skip:
                y = norm(layer.post_attention_layernorm.weight)
                mp = layer.mlp
                if lp.n_units == 0:
                    out = mp.down_proj.bias.expand(B, S, -1)
                else:
                    u = lp.unit_idx
                    iz = None if m.intermediate is None else _rows(m.intermediate[l], u)
                    out = ops.swiglu(y, _rows(mp.gate_proj.weight, u), _rows(mp.gate_proj.bias, u),
                                     _rows(mp.up_proj.weight, u), _rows(mp.up_proj.bias, u),
                                     _cols(mp.down_proj.weight, u), mp.down_proj.bias, iz)
                pend = scale(out, m.ffn, l)
            if output_hidden_states:
                flush()
        y = norm(self.model.norm.weight)
        return LlamaOutput(F.linear(y, self.lm_head.weight) if logits else None,
                           tuple(states) if output_hidden_states else None, plan, y)

    def _attention(self, a: _Attention, y: torch.Tensor, lp, hv: torch.Tensor | None, cos: torch.Tensor,
                   sin: torch.Tensor, mask: torch.Tensor | None, p_drop: float) -> torch.Tensor:
        """The attention sublayer on its live heads: y [B, S, d] -> o_proj output [B, S, d]."""
        B, S, _ = y.shape
        D = self.shape.head_dim
        nq = lp.n_q
        nk = self.shape.num_kv_heads if lp.kv_rows is None else lp.kv_rows.numel() // D
        q = F.linear(y, _rows(a.q_proj.weight, lp.q_rows), _rows(a.q_proj.bias, lp.q_rows))
        k = F.linear(y, _rows(a.k_proj.weight, lp.kv_rows), _rows(a.k_proj.bias, lp.kv_rows))
        v = F.linear(y, _rows(a.v_proj.weight, lp.kv_rows), _rows(a.v_proj.bias, lp.kv_rows))
        q = ops.apply_rope(q.view(B, S, nq, D).transpose(1, 2), cos, sin)
        k = ops.apply_rope(k.view(B, S, nk, D).transpose(1, 2), cos, sin)
        v = v.view(B, S, nk, D).transpose(1, 2)
        ctx = ops.causal_gqa_attention(q, k, v, lp.q_to_kv, lp.uniform, mask, p_drop, D ** -0.5)
        if hv is not None:
            ctx = ctx * _rows(hv, lp.q_idx)[:, None, None]
        ctx = ctx.transpose(1, 2).reshape(B, S, nq * D)
        return F.linear(ctx, _cols(a.o_proj.weight, lp.q_rows), a.o_proj.bias)

    # ------------------------------------------------------------------ load
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> CoFiLlamaForCausalLM:
        """A local transformers checkpoint folder (config.json + model.safetensors or sharded
        model.safetensors.index.json) of a LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM;
        weights read with safetensors (never unpickled), cast to ``dtype`` if given."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UserError(f"cofi.models.llama: path must be a checkpoint folder with config.json, got {folder}")
        config = AutoConfig.from_pretrained(str(folder))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"cofi.models.llama: {folder} must hold model.safetensors (or a sharded index); "
                            "cofi reads no pickled .bin weights")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        model = cls(config, init_weights=False).to(dtype or next(iter(sd.values())).dtype)  # load_state_dict copies into this dtype
        model.load_hf_state_dict(sd, source=str(folder))
        return model

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy a transformers *ForCausalLM state dict in (names as ``state_dict()``); a tied model
        may lack lm_head.weight; a missing or unexpected weight is one UserError line."""
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.shape.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        own = self.state_dict()
        if self.shape.tie_word_embeddings:
            own.pop("lm_head.weight")
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has weights this {self.shape.model_type} layout does not: {extra[:3]}"
            raise UserError(f"cofi.models.llama: {source} {what} ({len(missing)} missing, {len(extra)} unexpected)")
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise UserError(f"cofi.models.llama: {source}: {k} must have shape {tuple(own[k].shape)}, "
                                f"got {tuple(v.shape)}")
        self.load_state_dict(sd, strict=False)


__all__ = ["CoFiLlamaForCausalLM", "LlamaOutput"]
