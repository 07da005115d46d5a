"""Inference runtime of a compact (pruned) Llama-family decoder: prefill and incremental decoding
with a preallocated KV cache whose K/V head count is each layer's own.

Built once from a ``CompactLlamaForCausalLM`` (or a dense folder folded with no masks):

- q/k/v are one fused projection per layer and gate/up another (one GEMM each);
- ragged query heads per K/V group are padded to the largest group with zero query rows and zero
  o_proj columns (exact: a padded head's output is multiplied by 0), so every layer is a uniform GQA
  layout: prefill uses SDPA's ``enable_gqa`` and decoding folds a group's query heads into SDPA's
  query-length axis, so K/V are never copied or repeated;
- RoPE cos/sin come from transformers' rotary class, its frequencies in float32 whatever the
  weights' dtype (dynamic RoPE types, whose frequencies depend on the sequence length, are refused);
  with a cache they are looked up in the cache's table of every position it can hold;
- the cache is ``[B, G_l, T_max, D]`` per layer, allocated once per generation, written in place;
- bf16 / fp16 weights on a CPU without native half GEMMs (``torch.ops.mkldnn`` says so; AVX2 only):
  a projection over more than one token row runs in float32 on row blocks of the weight upcast
  in cache-sized chunks (``upcast_linear``), 3-10x faster there than torch's half GEMM and the same
  operation (that GEMM also accumulates in float32 and rounds once);
- a decoding step (one new token per row, at most ``decode_linear.MAX_ROWS`` rows, on CPU) runs every
  layer, the final norm and the head in one native call, ``cofi::llama_decode_step``
  (csrc/llama_decode; docs/decoder-runtime.md): the per-op path below op for op, in one parallel
  region, without ~20 dispatches per layer (``cofi.ops.last_backend("llama_decode_step")``:
  "native", or "torch" when the per-op path ran);
- projections over at most ``decode_linear.MAX_ROWS`` rows (decoding steps; batch 1 and 8) run the
  native streaming kernel ``cofi::decode_linear`` (float32 accumulation, rounded once, for every
  weight dtype; the weights read once, at close to the machine's read bandwidth for fp32; ratios in
  ``cofi.runtime.decode_linear``; ``cofi.ops.last_backend("decode_linear")`` says which ran).

Positions follow transformers with an attention mask: ``cumsum(mask) - 1`` (left padding puts a row's
first real token at position 0), so a padded batch gives each row its unpadded logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models import _decoder_ops as ops
from ..ops import _backends
from .compact_llama import CompactLlamaForCausalLM
from .decode_linear import native_linear, native_step, usable

_DYNAMIC_ROPE = ("dynamic", "longrope")
_UPCAST_CHUNK = 1 << 20  # float32 weight elements upcast at a time (4 MiB: stays in cache)


def needs_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """True for bf16 / fp16 on a CPU whose oneDNN has no native GEMM for that dtype."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    native = (torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16
              else torch.ops.mkldnn._is_mkldnn_fp16_supported)
    return not native()


def upcast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` computed in float32, rounded once to ``x.dtype``. x: [..., K];
    w: [N, K]; b: [N] | None. Returns [..., N]. The weight is upcast in row blocks, so no
    float32 copy of it is ever whole."""
    xf = x.float()
    out = x.new_empty(*x.shape[:-1], w.shape[0])
    step = max(1, _UPCAST_CHUNK // w.shape[1])
    for i in range(0, w.shape[0], step):
        out[..., i:i + step] = F.linear(xf, w[i:i + step].float(), None if b is None else b[i:i + step].float())
    return out


@dataclass
class KVCache:
    """Per-layer key / value buffers ``[B, G_l, T_max, D]`` (None for a layer without attention),
    ``valid`` bool ``[B, T_max]`` (key is a real token), ``length``: positions filled,
    ``next_pos`` int64 ``[B]``: the RoPE position of each row's next token; ``cos`` / ``sin``
    ``[T_max, D]``: RoPE at every position the cache can hold (transformers' rotary class run once
    over them, so a step looks its positions up instead of recomputing them)."""

    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    valid: torch.Tensor
    length: int
    next_pos: torch.Tensor
    padded: bool
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


class _Layer(nn.Module):
    """One decoder layer's runtime weights (buffers; attention or MLP may be absent)."""

    def __init__(self, layer, head_dim: int) -> None:
        super().__init__()
        a, m = layer.self_attn, layer.mlp
        self.attn = a is not None and a.nq > 0
        self.attn_bias = (a.o_proj.bias.detach().clone() if a is not None and a.nq == 0 and a.o_proj.bias is not None
                          else None)
        if self.attn:
            D, G = head_dim, a.nk
            groups = [[j for j, g in enumerate(a.q_to_kv.tolist()) if g == kv] for kv in range(G)]
            n = max(len(g) for g in groups)
            wq = a.q_proj.weight.detach().view(a.nq, D, -1)
            bq = a.q_proj.bias.detach().view(a.nq, D) if a.q_proj.bias is not None else None
            wo = a.o_proj.weight.detach().view(a.o_proj.weight.shape[0], a.nq, D)
            q_w = wq.new_zeros(G, n, D, wq.shape[-1])
            o_w = wo.new_zeros(wo.shape[0], G, n, D)
            q_b = None if bq is None else bq.new_zeros(G, n, D)
            for g, heads in enumerate(groups):
                idx = torch.tensor(heads, dtype=torch.int64)
                q_w[g, : len(heads)] = wq[idx]
                o_w[:, g, : len(heads)] = wo[:, idx]
                if q_b is not None:
                    q_b[g, : len(heads)] = bq[idx]
            self.nq, self.nk, self.group = G * n, G, n
            self.register_buffer("ln1", layer.input_layernorm.weight.detach().clone())
            self.register_buffer("qkv_w", torch.cat([q_w.reshape(G * n * D, -1), a.k_proj.weight.detach(),
                                                     a.v_proj.weight.detach()]).contiguous())
            self.register_buffer("qkv_b", None if q_b is None else torch.cat(
                [q_b.reshape(-1), a.k_proj.bias.detach(), a.v_proj.bias.detach()]))
            self.register_buffer("o_w", o_w.reshape(wo.shape[0], G * n * D).contiguous())
            self.register_buffer("o_b", None if a.o_proj.bias is None else a.o_proj.bias.detach().clone())
        self.mlp = m is not None and m.width > 0
        self.mlp_bias = (m.down_proj.bias.detach().clone() if m is not None and m.width == 0
                         and m.down_proj.bias is not None else None)
        if self.mlp:
            self.width = m.width
            self.register_buffer("ln2", layer.post_attention_layernorm.weight.detach().clone())
            self.register_buffer("gu_w", torch.cat([m.gate_proj.weight.detach(), m.up_proj.weight.detach()]).contiguous())
            self.register_buffer("gu_b", None if m.gate_proj.bias is None else torch.cat(
                [m.gate_proj.bias.detach(), m.up_proj.bias.detach()]))
            self.register_buffer("down_w", m.down_proj.weight.detach().contiguous())
            self.register_buffer("down_b", None if m.down_proj.bias is None else m.down_proj.bias.detach().clone())


class LlamaRuntime(nn.Module):
    """forward(input_ids [B, S], attention_mask [B, S] | None, cache | None, last_only) -> logits
    [B, S, V] (or [B, 1, V] at each row's last real token with ``last_only``). With a cache the S
    new tokens are appended after the cached ones (prefill: an empty cache from ``new_cache``)."""

    def __init__(self, model: CompactLlamaForCausalLM) -> None:
        super().__init__()
        c = model.config
        rope = c.base.get("rope_parameters") or c.base.get("rope_scaling") or {}
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        if any(kind.startswith(k) for k in _DYNAMIC_ROPE):
            raise UserError(f"cofi.runtime.llama_runtime: rope_type must be a static type (default, linear, llama3, "
                            f"yarn, ...), got {kind!r}")
        self.config, self.eps, self.head_dim = c, model.eps, c.head_dim
        self.base_shape = model.base_shape
        w = model.model.embed_tokens.weight.detach()
        self.register_buffer("embed", w)
        self.register_buffer("lm_head", model.lm_head.weight.detach())
        self.register_buffer("norm", model.model.norm.weight.detach().clone())
        self.layers = nn.ModuleList(_Layer(layer, c.head_dim) for layer in model.model.layers)
        self.rotary = ops.rotary_embedding(c.hf_config()).to(self.device)
        self.upcast = needs_upcast(self.dtype, self.device)
        self._step_args: tuple[list, list[int]] | None = None

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        # RoPE frequencies stay float32 whatever the weights' dtype, as transformers' from_pretrained keeps
        # them: inv_freq rounded to bf16 turns each angle by up to 2^-9 of position x frequency
        self.rotary = ops.rotary_embedding(self.config.hf_config()).to(self.device)
        self.upcast = needs_upcast(self.dtype, self.device)
        self._step_args = None
        return out

    def step_args(self) -> tuple[list, list[int]]:
        """(params, dims) of ``cofi::llama_decode_step``: per layer ln1, qkv_w, qkv_b, o_w, o_b,
        attn_bias, ln2, gu_w, gu_b, down_w, down_b, mlp_bias (None where absent) and (query heads,
        K/V heads, SwiGLU width), 0 for an absent sublayer."""
        if self._step_args is None:
            params: list = []
            dims: list[int] = []
            for x in self.layers:
                a = [x.ln1, x.qkv_w, x.qkv_b, x.o_w, x.o_b] if x.attn else [None] * 5
                m = [x.ln2, x.gu_w, x.gu_b, x.down_w, x.down_b] if x.mlp else [None] * 5
                params += a + [x.attn_bias] + m + [x.mlp_bias]
                dims += [x.nq if x.attn else 0, x.nk if x.attn else 0, x.width if x.mlp else 0]
            self._step_args = (params, dims)
        return self._step_args

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] @ w [N, K]^T + b -> [..., N]: the streaming kernel for a few rows; float32 over
        row blocks where half GEMMs are slow."""
        if usable(x, w):
            return native_linear(x, w, b)
        if self.upcast and x.numel() > x.shape[-1]:
            return upcast_linear(x, w, b)
        return F.linear(x, w, b)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``batch`` rows and ``capacity`` positions (prompt + new tokens)."""
        self.base_shape.check_length(capacity)
        k: list[torch.Tensor | None] = []
        v: list[torch.Tensor | None] = []
        for layer in self.layers:
            shape = (batch, layer.nk, capacity, self.head_dim) if layer.attn else None
            k.append(None if shape is None else torch.empty(shape, dtype=self.dtype, device=self.device))
            v.append(None if shape is None else torch.empty(shape, dtype=self.dtype, device=self.device))
        cos, sin = self.rotary(self.embed[:1, None], torch.arange(capacity, device=self.device)[None])
        return KVCache(k, v, torch.zeros(batch, capacity, dtype=torch.bool, device=self.device), 0,
                       torch.zeros(batch, dtype=torch.int64, device=self.device), False, cos[0], sin[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                present: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """``attention_mask``: None when no position is padding (the fast causal path). ``present``:
        a list that receives each attention layer's (k, v) ``[B, G_l, S, D]`` (after RoPE)."""
        B, S = input_ids.shape
        start = 0 if cache is None else cache.length
        if cache is not None and start + S > cache.capacity:
            raise UserError(f"cofi.runtime.llama_runtime: cache holds {cache.capacity} positions, "
                            f"got {start} cached + {S} new")
        self.base_shape.check_length(start + S)
        if (attention_mask is None and cache is not None and S == 1 and start > 0 and present is None
                and native_step(B, self.dtype, self.device)):
            return self._decode_step(input_ids, cache, start)
        keep = None if attention_mask is None else attention_mask.to(torch.bool)
        if cache is not None:
            cache.valid[:, start:start + S] = True if keep is None else keep
            cache.padded = cache.padded or keep is not None
        if keep is None:
            pos = torch.arange(S, device=input_ids.device)[None].expand(B, S)
            if cache is not None:
                pos = pos + cache.next_pos[:, None]
        else:
            pos = keep.long().cumsum(1) - 1 + (0 if cache is None else cache.next_pos[:, None])
            pos = pos.clamp_min(0)
        if cache is not None:
            cache.next_pos = pos[:, -1] + 1 if keep is None else cache.next_pos + keep.long().sum(1)
        r = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(r, pos) if cache is None else (cache.cos[pos], cache.sin[pos])  # [B, S, D]
        mask = self._mask(keep, cache, start, S)
        d = r.shape[-1]
        r = self._layers(r, cos[:, None], sin[:, None], mask, cache, start, present)
        if cache is not None:
            cache.length = start + S
        if last_only:
            if keep is None:
                r = r[:, -1:]
            else:
                last = (keep.long() * torch.arange(S, device=keep.device)).argmax(1)
                r = r[torch.arange(B, device=r.device), last][:, None]
        return self.linear(F.rms_norm(r, (d,), self.norm, self.eps), self.lm_head, None)

    def _decode_step(self, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """One new token per row (input_ids [B, 1], no padding among them) after ``start`` cached ones:
        every layer, the final norm and the head in one native call; the few tensor ops around it
        are what the general path computes for this case. Returns logits [B, 1, V]."""
        pos = cache.next_pos
        cache.valid[:, start] = True
        cache.next_pos = pos + 1
        cache.length = start + 1
        mask = self._mask(None, cache, start, 1)
        params, dims = self.step_args()
        none = self.embed.new_empty(0)
        k = [none if t is None else t for t in cache.k]
        v = [none if t is None else t for t in cache.v]
        m = None if mask is None else mask[:, :, 0][:, :, None]
        out = torch.ops.cofi.llama_decode_step(self.embed[input_ids[:, 0]], params, dims, cache.cos[pos],
                                               cache.sin[pos], k, v, start, m, self.head_dim, self.eps, self.norm,
                                               self.lm_head)
        _backends.record("llama_decode_step", "native", self.device)
        return out[:, None]

    def _layers(self, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, start: int, present: list | None) -> torch.Tensor:
        """The per-op path: r [B, S, d]; cos, sin [B, 1, S, D] (broadcast over heads)."""
        _backends.record("llama_decode_step", "torch", r.device)
        d = r.shape[-1]
        for i, layer in enumerate(self.layers):
            if layer.attn:
                y = F.rms_norm(r, (d,), layer.ln1, self.eps)
                r = r + self._attention(layer, i, y, cos, sin, mask, cache, start, present)
            elif layer.attn_bias is not None:
                r = r + layer.attn_bias
            if layer.mlp:
                y = F.rms_norm(r, (d,), layer.ln2, self.eps)
                gu = self.linear(y, layer.gu_w, layer.gu_b)
                r = r + self.linear(F.silu(gu[..., :layer.width]) * gu[..., layer.width:], layer.down_w, layer.down_b)
            elif layer.mlp_bias is not None:
                r = r + layer.mlp_bias
        return r

    @staticmethod
    def _mask(keep: torch.Tensor | None, cache: KVCache | None, start: int, S: int) -> torch.Tensor | None:
        """None (plain causal over the new tokens, or everything visible when decoding one token
        without padding) or bool [B, 1, S, start + S] (True = attend)."""
        if cache is None or start == 0:
            return ops.causal_mask(keep, S) if keep is not None else None
        if not cache.padded and S == 1:
            return None
        T = start + S
        vis = cache.valid[:, None, None, :T].expand(-1, 1, S, T)
        causal = torch.ones(S, T, dtype=torch.bool, device=vis.device).tril(start)
        m = vis & causal
        return m | (~m.any(-1, keepdim=True) & causal)

    def _attention(self, layer: _Layer, i: int, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, cache: KVCache | None, start: int,
                   present: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        B, S, _ = y.shape
        D, hq, hk = self.head_dim, layer.nq, layer.nk
        qkv = self.linear(y, layer.qkv_w, layer.qkv_b).view(B, S, hq + 2 * hk, D).transpose(1, 2)
        # RoPE on q and k in one pass (transformers' rotate_half and operation order); decoding is
        # bound by per-op dispatch for small models, so each layer keeps its op count low
        qk, half = qkv[:, :hq + hk], D // 2
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hk:]
        if present is not None:
            present.append((k, v))
        if cache is not None:
            cache.k[i].narrow(2, start, S).copy_(k)
            cache.v[i].narrow(2, start, S).copy_(v)
            k, v = cache.k[i].narrow(2, 0, start + S), cache.v[i].narrow(2, 0, start + S)
        if S == 1 and start > 0:
            # one new token per row: a group's query heads become SDPA's query rows over its K/V head
            qg = q.reshape(B, hk, layer.group, D)
            m = None if mask is None else mask[:, :, 0][:, :, None]
            ctx = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=D ** -0.5)
            ctx = ctx.reshape(B, 1, hq * D)
        else:
            causal = mask is None
            if start > 0 and causal:
                mask = torch.ones(S, start + S, dtype=torch.bool, device=y.device).tril(start)
                causal = False
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=D ** -0.5,
                                                 enable_gqa=hq != hk)
            ctx = ctx.transpose(1, 2).reshape(B, S, hq * D)
        return self.linear(ctx, layer.o_w, layer.o_b)


__all__ = ["KVCache", "LlamaRuntime", "needs_upcast", "upcast_linear"]
