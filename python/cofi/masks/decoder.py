"""Masks of a Llama-family decoder: its shape and layout, the ``DecoderMasks`` container, the GQA
rule, and the exact and expected parameter counts (formulas in ``cofi.vocab``; docs/decoder.md).

GQA rule: query head h of layer l belongs to K/V group g(h) = h // (H / G) (transformers' repeat_kv);
it acts with the value head[l, h] * kv[l, g(h)] and is kept iff that value is nonzero. A K/V group is
kept iff kv[l, g] != 0 and at least one of its query heads is kept; an attention sublayer is removed
when its mha gate is 0, or when it keeps no head and has no o_proj bias.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import UserError
from ..vocab import (
    DECODER_GROUPS,
    decoder_attention_params,
    decoder_embedding_params,
    decoder_group_shapes,
    decoder_mlp_params,
)

# model_type -> (q/k/v bias, o bias, mlp bias); None = read from the config (Llama's attention_bias / mlp_bias)
LAYOUTS: dict[str, tuple[bool | None, bool | None, bool | None]] = {
    "llama": (None, None, None), "qwen2": (True, False, False), "mistral": (False, False, False)}


@dataclass(frozen=True)
class DecoderShape:
    """Sizes and layout of a Llama-family causal LM. ``windows``: per layer the sliding-window size
    (None = full causal attention); the models refuse inputs longer than a window."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    rms_norm_eps: float
    windows: tuple[int | None, ...]

    @property
    def group_size(self) -> int:
        """Query heads per K/V group, H / G."""
        return self.num_heads // self.num_kv_heads

    def shape(self, group: str) -> tuple[int, ...]:
        """hidden (d,), head (L, H), kv (L, G), mha (L,), intermediate (L, F), ffn (L,)."""
        return decoder_group_shapes(self.num_layers, self.hidden_size, self.num_heads, self.num_kv_heads,
                                    self.intermediate_size)[group]

    @classmethod
    def from_hf_config(cls, config: Any) -> DecoderShape:
        """The shape of a transformers LlamaConfig / Qwen2Config / MistralConfig; anything cofi's
        decoder does not run is one UserError line naming the field."""
        who = "cofi.models.llama"
        mt = getattr(config, "model_type", None)
        if mt not in LAYOUTS:
            raise UserError(f"{who}: config.model_type must be one of {sorted(LAYOUTS)}, got {mt!r}")
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{who}: config.hidden_act must be 'silu' (SwiGLU), got {act!r}")
        H, G = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
        if G <= 0 or H % G:
            raise UserError(f"{who}: num_attention_heads ({H}) must be a multiple of num_key_value_heads ({G})")
        tp = getattr(config, "pretraining_tp", 1) or 1
        if tp != 1:
            raise UserError(f"{who}: config.pretraining_tp must be 1, got {tp}")
        qkv, o, mlp = LAYOUTS[mt]
        ab = bool(getattr(config, "attention_bias", False))
        L = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        if mt == "qwen2":
            types = getattr(config, "layer_types", None) or ["full_attention"] * L
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        elif mt == "mistral":
            windows = (window,) * L
        else:
            windows = (None,) * L
        d = int(config.hidden_size)
        return cls(model_type=mt, num_layers=L, hidden_size=d, num_heads=H, num_kv_heads=G,
                   head_dim=int(getattr(config, "head_dim", None) or d // H),
                   intermediate_size=int(config.intermediate_size), vocab_size=int(config.vocab_size),
                   qkv_bias=ab if qkv is None else qkv, o_bias=ab if o is None else o,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)) if mlp is None else mlp,
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   rms_norm_eps=float(config.rms_norm_eps), windows=windows)

    def check_length(self, seq_len: int) -> None:
        """UserError when a sliding window would apply to a sequence of ``seq_len`` tokens."""
        for i, w in enumerate(self.windows):
            if w is not None and seq_len > w:
                raise UserError(f"cofi.models.llama: input length must be <= sliding_window {w} (layer {i} of "
                                f"this {self.model_type} model slides; cofi runs full causal attention), got {seq_len}")


@dataclass
class DecoderMasks:
    """Mask values of one step: hidden [d], head [L, H], kv [L, G], mha [L], intermediate [L, F],
    ffn [L]; a group that is None is not applied (all ones)."""

    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    mha: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    ffn: torch.Tensor | None = None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(group, tensor) for every present group, in ``DECODER_GROUPS`` order."""
        for g in DECODER_GROUPS:
            t = getattr(self, g)
            if t is not None:
                yield g, t

    def map(self, fn) -> DecoderMasks:
        """fn applied to every present group."""
        return DecoderMasks(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                               for f in fields(self)})

    def to(self, *args: object, **kw: object) -> DecoderMasks:
        return self.map(lambda t: t.to(*args, **kw))

    def binarize(self) -> DecoderMasks:
        """1 where a value is nonzero, 0 elsewhere (same dtype)."""
        return self.map(lambda t: (t != 0).to(t.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {g: t.detach().cpu().clone() for g, t in self.items()}

    @classmethod
    def ones(cls, shape: DecoderShape, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> DecoderMasks:
        """All groups present, all ones."""
        return cls(**{g: torch.ones(shape.shape(g), dtype=dtype, device=device) for g in DECODER_GROUPS})

    def check(self, shape: DecoderShape, who: str = "cofi.models.llama") -> None:
        """UserError naming the first group whose shape is not the model's."""
        for g, t in self.items():
            if tuple(t.shape) != shape.shape(g):
                raise UserError(f"{who}: masks.{g} must have shape {shape.shape(g)}, got {tuple(t.shape)}")


def effective_heads(head: torch.Tensor | None, kv: torch.Tensor | None, group_size: int) -> torch.Tensor | None:
    """The value each query head acts with, head * kv[g(h)]: [L, H] (or [H]); None when both are None."""
    if kv is None:
        return head
    kv_q = kv.repeat_interleave(group_size, dim=-1)
    return kv_q if head is None else head * kv_q


@dataclass
class KeptLayer:
    """What one layer keeps (original indices). q_heads: kept query heads; kv_heads: kept K/V groups;
    q_to_kv: for each kept query head, the position of its group in kv_heads; attention / mlp: the
    sublayer is computed at all; units: kept SwiGLU units."""

    attention: bool
    q_heads: list[int]
    kv_heads: list[int]
    q_to_kv: list[int]
    mlp: bool
    units: list[int]


def _nz(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if t is None:
        return torch.ones(shape, dtype=torch.bool)
    return (t.detach().to("cpu") != 0).reshape(shape)


def kept_structure(masks: DecoderMasks | None, shape: DecoderShape) -> tuple[list[int], list[KeptLayer]]:
    """(kept hidden dims, one ``KeptLayer`` per layer) of a deterministic mask set, by the GQA rule."""
    m = masks or DecoderMasks()
    s = shape
    hid = torch.nonzero(_nz(m.hidden, s.shape("hidden"))).flatten().tolist()
    q = _nz(effective_heads(m.head, m.kv, s.group_size) if m.head is not None or m.kv is not None else None,
            s.shape("head"))
    mha, inter, ffn = _nz(m.mha, (s.num_layers,)), _nz(m.intermediate, s.shape("intermediate")), _nz(m.ffn, (s.num_layers,))
    layers = []
    for l in range(s.num_layers):
        qh = torch.nonzero(q[l]).flatten().tolist() if mha[l] else []
        kv = sorted({h // s.group_size for h in qh})
        pos = {g: i for i, g in enumerate(kv)}
        units = torch.nonzero(inter[l]).flatten().tolist() if ffn[l] else []
        layers.append(KeptLayer(attention=bool(mha[l]) and (bool(qh) or s.o_bias), q_heads=qh, kv_heads=kv,
                                q_to_kv=[pos[h // s.group_size] for h in qh],
                                mlp=bool(ffn[l]) and (bool(units) or s.mlp_bias), units=units))
    return hid, layers


def real_size(masks: DecoderMasks | None, shape: DecoderShape) -> dict[str, int]:
    """Exact parameters a folded model keeps: body (layers + final RMSNorm), embedding, lm_head
    (0 when tied: the fold keeps the tie) and total."""
    hid, layers = kept_structure(masks, shape)
    d, s = len(hid), shape
    body = d
    for k in layers:
        if k.attention:
            body += decoder_attention_params(d, len(k.q_heads), len(k.kv_heads), s.head_dim, s.qkv_bias, s.o_bias,
                                             norm=int(bool(k.q_heads)))
        if k.mlp:
            body += decoder_mlp_params(d, len(k.units), s.mlp_bias, norm=int(bool(k.units)))
    emb, head = decoder_embedding_params(s.vocab_size, d, s.tie_word_embeddings)
    return {"body": body, "embedding": emb, "lm_head": head, "total": body + emb + head}


def expected_size(keep: DecoderMasks, shape: DecoderShape) -> dict[str, torch.Tensor]:
    """Expected parameters (differentiable) from keep probabilities P(z != 0), groups independent:
    E[d'] = sum hidden; per layer E[query heads] = sum_h p_h p_kv(g(h)), E[K/V heads] = sum_g p_kv(g)
    (1 - prod_{h in g} (1 - p_h)), the norm counted with P(any head kept), all times the mha gate
    (MLP alike). Equals ``real_size`` for 0/1 values. Returns body, embedding, lm_head, total."""
    s = shape
    ref = next((t for _, t in keep.items()), None)
    if ref is None:
        raise UserError("cofi.masks.decoder.expected_size: keep must hold at least one group")

    def get(g: str) -> torch.Tensor:
        t = getattr(keep, g)
        return ref.new_ones(s.shape(g)) if t is None else t

    d = get("hidden").sum()
    head, kv, mha, inter, ffn = get("head"), get("kv"), get("mha"), get("intermediate"), get("ffn")
    q = head * kv.repeat_interleave(s.group_size, dim=-1)                                     # [L, H]
    grp_any = 1 - torch.prod(1 - head.reshape(s.num_layers, s.num_kv_heads, s.group_size), dim=-1)
    kvk = (kv * grp_any).sum(-1)                                                                # [L]
    q_any = 1 - torch.prod(1 - q, dim=-1)
    attn = mha * decoder_attention_params(d, q.sum(-1), kvk, s.head_dim, s.qkv_bias, s.o_bias, norm=q_any)
    u_any = 1 - torch.prod(1 - inter, dim=-1)
    mlp = ffn * decoder_mlp_params(d, inter.sum(-1), s.mlp_bias, norm=u_any)
    body = d + attn.sum() + mlp.sum()
    emb, lm = decoder_embedding_params(s.vocab_size, d, s.tie_word_embeddings)
    lm = torch.zeros_like(d) if s.tie_word_embeddings else lm
    return {"body": body, "embedding": emb, "lm_head": lm, "total": body + emb + lm}


def full_size(shape: DecoderShape) -> dict[str, int]:
    """``real_size`` of the unpruned model (SmolLM2-135M: total 134,515,008)."""
    return real_size(None, shape)


__all__ = [
    "LAYOUTS",
    "DecoderMasks",
    "DecoderShape",
    "KeptLayer",
    "effective_heads",
    "expected_size",
    "full_size",
    "kept_structure",
    "real_size",
]
