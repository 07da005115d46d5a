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

With every mask 1 (or None) this is transformers' model. Two ways to run the same math, as the
encoder (``forward(backend=...)``, default ``self.backend``):

- ``"compact"``: after one host copy of the masks (``decoder_plan``) the kept hidden dims, live
  query heads, K/V groups and SwiGLU units are gathered (``index_select``: gradients scatter back
  into the full parameters) and only they are computed, on cofi's fused ops (``masked_attention``
  causal / GQA with head and K/V-group gates, ``masked_ffn`` SwiGLU with live-unit lists,
  ``masked_add_rms_norm``); the residual stream runs at the kept width d'; sublayers that add
  nothing are skipped. Hidden states and the final norm output come back at width d (pruned dims 0).
- ``"dense"``: the dense-masked method: full-width GEMMs, every head and unit computed, the masks
  multiplied, on cofi's plain-PyTorch reference ops; no host sync. Its cost does not fall with sparsity.

Gradients at exact zeros follow the ops' convention (a head, unit or group whose value is exactly 0
gets gradient 0); a layer gate that is exactly 0 gets gradient 0 in compact mode (skipped) and its
analytic one in dense mode. Hard-concrete's clip gives 0 there anyway.
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
from ..ops import masked_add_rms_norm, masked_attention, masked_ffn
from ..ops.reference import masked_add_rms_norm_ref, masked_attention_ref, masked_ffn_gated_ref
from . import _decoder_ops as ops
from .decoder_plan import DecoderLayerPlan, DecoderPlan, make_decoder_plan

BACKENDS = ("compact", "dense")


@dataclass
class LlamaOutput:
    """logits [B, S, V] (None when not asked for); hidden_states: (embedding output, each layer's
    output), each the residual stream [B, S, d] before the final norm, or None; plan: the step's
    live-unit plan (None for backend="dense"); last_hidden: the final norm's output [B, S, d] (logits = last_hidden @ lm_head^T)."""

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


@dataclass
class _Ctx:
    """What every sublayer of one forward reads: masks (in the activations' dtype), head values
    head * kv [L, H], rotary cos / sin [B, S, D], key padding [B, S] (True = token), attention
    dropout, kept hidden dims (compact, None = all)."""

    m: DecoderMasks
    hv: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    kpm: torch.Tensor | None
    p_drop: float
    hk: torch.Tensor | None


class _Stream:
    """The pre-norm residual stream with the last sublayer output held back, so that the next norm
    adds it in one fused pass (``masked_add_rms_norm``: s = x * hidden_z + residual).

    dense (reference op, full width): outputs arrive multiplied by z, norms take hidden_z = 1[z != 0]
    and weight w * z. compact (fused op, kept dims hk only): outputs arrive without z, norms take
    hidden_z = z[hk] (all nonzero) and weight w[hk]. Both give y = RMSNorm_K(r) * w * z."""

    def __init__(self, first: torch.Tensor, z: torch.Tensor | None, hk: torch.Tensor | None, eps: float,
                 dense: bool) -> None:
        self.dense, self.eps, self.hk = dense, eps, hk
        self.z = z if z is None or hk is None else z.index_select(0, hk)
        self.keep = None if z is None or not dense else (z != 0).to(z.dtype)
        self.pend: torch.Tensor | None = first if z is None or not dense else first * z
        self.r: torch.Tensor | None = None

    def add(self, out: torch.Tensor) -> None:
        self.pend = out if self.z is None or not self.dense else out * self.z

    def flush(self) -> torch.Tensor:
        """The stream with the held-back output added: [B, S, d] (dense) or [B, S, d'] (compact)."""
        if self.pend is not None:
            x = self.pend if self.dense or self.z is None else self.pend * self.z
            self.r, self.pend = (x if self.r is None else x + self.r), None
        return self.r

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        """The norm with weight w [d] of the stream (its pending output added in): [B, S, d'] ."""
        z = self.z
        if self.dense:
            x, res = (self.pend, self.r) if self.pend is not None else (self.r, None)
            y, self.r = masked_add_rms_norm_ref(x, res, w if z is None else w * z, self.keep, self.eps)
        elif self.pend is not None:
            y, self.r = masked_add_rms_norm(self.pend, self.r, _rows(w, self.hk), z, self.eps)
        else:  # after a flush the stream already holds z
            wk = _rows(w, self.hk)
            y = masked_add_rms_norm(self.r, None, wk if z is None else wk * z, None, self.eps)[0]
        self.pend = None
        return y


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
        self.backend = "compact"  # forward's default (the bench and checks set "dense")
        self._units: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                masks: DecoderMasks | None = None, output_hidden_states: bool = False,
                logits: bool = True, backend: str | None = None) -> LlamaOutput:
        """input_ids [B, S]; attention_mask [B, S] (1 = token, 0 = padding) or None; positions are
        0..S-1 as in transformers without a cache. masks: None = the plain model. ``logits=False``:
        stop at the final norm (``last_hidden``), for losses that apply the LM head in chunks.
        backend: "compact" (live units only, cofi's fused ops) or "dense" (full width, masks
        multiplied, cofi's reference ops); None = ``self.backend``."""
        backend = self.backend if backend is None else backend
        if backend not in BACKENDS:
            raise UserError(f"cofi.models.llama: backend must be one of {BACKENDS}, got {backend!r}")
        s = self.shape
        B, S = input_ids.shape
        s.check_length(S)
        if masks is not None:
            masks.check(s)
        dense = backend == "dense"
        plan = None if dense else make_decoder_plan(masks, s, input_ids.device)
        hk = None if plan is None else plan.hidden_idx
        if hk is not None and hk.numel() == 0:  # no kept hidden dim: every norm output is 0
            y = self.lm_head.weight.new_zeros(B, S, s.hidden_size)
            st = (y,) * (s.num_layers + 1) if output_hidden_states else None
            return LlamaOutput(F.linear(y, self.lm_head.weight) if logits else None, st, plan, y)
        emb = self.model.embed_tokens(input_ids)
        m = masks.map(lambda t: t.to(emb.dtype)) if masks is not None else DecoderMasks()
        cos, sin = self.model.rotary_emb(emb, torch.arange(S, device=input_ids.device)[None].expand(B, S))
        ctx = _Ctx(m, effective_heads(m.head, m.kv, s.group_size), cos, sin,
                   None if attention_mask is None else attention_mask != 0,
                   float(getattr(self.config, "attention_dropout", 0.0)) if self.training else 0.0, hk)
        st = _Stream(emb if hk is None else emb.index_select(-1, hk), m.hidden, hk, s.rms_norm_eps, dense)
        states: list[torch.Tensor] = []
        if output_hidden_states:
            states.append(self._widen(st.flush(), hk))
        for l, layer in enumerate(self.model.layers):
            lp = None if plan is None else plan.layers[l]
            if dense or not lp.attn_skip:
                y = st.norm(layer.input_layernorm.weight)
                st.add(self._attn_dense(layer.self_attn, y, ctx, l) if dense
                       else self._attn_compact(layer.self_attn, y, ctx, l, lp))
            if dense or not lp.mlp_skip:
                y = st.norm(layer.post_attention_layernorm.weight)
                st.add(self._mlp_dense(layer.mlp, y, ctx, l) if dense else self._mlp_compact(layer.mlp, y, ctx, l, lp))
            if output_hidden_states:
                states.append(self._widen(st.flush(), hk))
        y = self._widen(st.norm(self.model.norm.weight), hk)
        return LlamaOutput(F.linear(y, self.lm_head.weight) if logits else None,
                           tuple(states) if output_hidden_states else None, plan, y)

    def _widen(self, x: torch.Tensor, hk: torch.Tensor | None) -> torch.Tensor:
        """[..., d'] on the kept dims hk -> [..., d] with 0 on the pruned ones (differentiable)."""
        if hk is None:
            return x
        return x.new_zeros(*x.shape[:-1], self.shape.hidden_size).index_copy(-1, hk, x)

    def _qkv(self, a: _Attention, y: torch.Tensor, ctx: _Ctx, q_rows, kv_rows, hk):
        """Rotated q [B, nq, S, D], k [B, nk, S, D] and v [B, nk, S, D] (a view) of the given rows."""
        B, S, _ = y.shape
        D = self.shape.head_dim
        q, k, v = (F.linear(y, _cols(_rows(p.weight, r), hk), _rows(p.bias, r)).view(B, S, -1, D).transpose(1, 2)
                   for p, r in ((a.q_proj, q_rows), (a.k_proj, kv_rows), (a.v_proj, kv_rows)))
        return ops.apply_rope(q, ctx.cos, ctx.sin), ops.apply_rope(k, ctx.cos, ctx.sin), v

    # dense: full width, every head and unit computed, masks multiplied (the reference ops); the
    # caller multiplies the output by the hidden mask z
    def _attn_dense(self, a: _Attention, y: torch.Tensor, ctx: _Ctx, l: int) -> torch.Tensor:
        B, S, _ = y.shape
        q, k, v = self._qkv(a, y, ctx, None, None, None)
        hz = None if ctx.hv is None else ctx.hv[l]
        o = masked_attention_ref(q, k, v, hz, ctx.kpm, self.shape.head_dim ** -0.5, ctx.p_drop, causal=True)
        out = F.linear(o.transpose(1, 2).reshape(B, S, -1), a.o_proj.weight, a.o_proj.bias)
        return out if ctx.m.mha is None else out * ctx.m.mha[l]

    def _mlp_dense(self, mp: _MLP, y: torch.Tensor, ctx: _Ctx, l: int) -> torch.Tensor:
        m = ctx.m
        return masked_ffn_gated_ref(y, mp.gate_proj.weight, mp.gate_proj.bias, mp.up_proj.weight, mp.up_proj.bias,
                                    mp.down_proj.weight, mp.down_proj.bias, None if m.intermediate is None else
                                    m.intermediate[l], None if m.ffn is None else m.ffn[l])

    # compact: live heads / groups / units and kept hidden dims only (cofi's fused ops); the
    # layer gate is folded in, the caller's norm multiplies by the kept hidden values
    def _attn_compact(self, a: _Attention, y: torch.Tensor, ctx: _Ctx, l: int, lp: DecoderLayerPlan) -> torch.Tensor:
        B, S, _ = y.shape
        m, hk = ctx.m, ctx.hk
        wo, bo = _rows(_cols(a.o_proj.weight, lp.q_rows), hk), _rows(a.o_proj.bias, hk)
        if m.mha is not None:  # gate on W_O and b_O: d' x n_q D multiplies instead of B S x d'
            wo, bo = wo * m.mha[l], None if bo is None else bo * m.mha[l]
        if lp.n_q == 0:  # no head left: the sublayer adds its (gated) bias
            return bo.expand(B, S, -1)
        q, k, v = self._qkv(a, y, ctx, lp.q_rows, lp.kv_rows, hk)
        hz = None if m.head is None else _rows(m.head[l], lp.q_idx)
        kz = None if m.kv is None else _rows(m.kv[l], lp.kv_idx)
        if not lp.uniform:  # ragged heads per group: each query head gets its own copy of its K/V
            k, v = k.index_select(1, lp.q_to_kv), v.index_select(1, lp.q_to_kv)
            if kz is not None:
                kz = kz.index_select(0, lp.q_to_kv)
                hz, kz = (kz if hz is None else hz * kz), None
        o = masked_attention(q, k, v, hz, ctx.kpm, self.shape.head_dim ** -0.5, ctx.p_drop, causal=True, kv_z=kz)
        return F.linear(o.transpose(1, 2).reshape(B, S, -1), wo, bo)

    def _mlp_compact(self, mp: _MLP, y: torch.Tensor, ctx: _Ctx, l: int, lp: DecoderLayerPlan) -> torch.Tensor:
        m, hk = ctx.m, ctx.hk
        g = None if m.ffn is None else m.ffn[l]
        bd = _rows(mp.down_proj.bias, hk)
        if lp.n_units == 0:  # no unit left: the sublayer adds its (gated) bias
            return (bd if g is None else bd * g).expand(*y.shape[:-1], -1)
        iz = None if m.intermediate is None else m.intermediate[l]
        live = lp.unit_idx
        if live is None and (iz is not None or g is not None):  # all units: tells the op not to sync
            live = self._all_units(y.device)
        return masked_ffn(y, _cols(mp.up_proj.weight, hk), mp.up_proj.bias, _rows(mp.down_proj.weight, hk), bd, iz, g,
                          activation="swiglu", live_idx=live, gate_weight=_cols(mp.gate_proj.weight, hk),
                          gate_bias=mp.gate_proj.bias)

    def _all_units(self, device: torch.device) -> torch.Tensor:
        t = self._units.get(str(device))
        if t is None:
            t = self._units[str(device)] = torch.arange(self.shape.intermediate_size, device=device)
        return t

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
