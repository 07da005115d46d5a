"""The masked BERT/RoBERTa encoder shared by every task model (HF parameter names).

Two ways to run the same math (docs/cofi-reference.md section 1.7 mask points):

- ``backend="dense"``: the reference's method. Full-width GEMMs; the masks multiply the activations
  (embeddings pre/post LN, head gate after softmax.V, MHA gate on W_O output incl. bias,
  intermediate gate after the activation, FFN gate on W_2 output incl. bias, hidden gate before the
  residual LN and after it, LN statistics over kept hidden dims). Uses ``cofi.ops.reference``.
- ``backend="compact"``: after one host copy of the masks (``plan.make_plan``), the live hidden dims,
  heads and FFN units are gathered (``index_select``, so autograd scatters gradients back into the
  full parameters) and every GEMM runs on live units only; the residual stream runs at the reduced
  hidden width. Uses the fused ``cofi.ops``.

A sublayer whose layer gate (mha / ffn) is exactly 0 is the identity (its LayerNorm skipped too),
decided from the mask value. Compact mode skips its work; dense mode, like the reference, still
computes it, multiplies it by the zero gate and adds it to the residual (the reference finds the
all-zero output with a host-synchronising check), so ``backend="dense"`` costs what the reference
costs at every sparsity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..masks import Masks
from ..vocab import HF_ACTIVATIONS as _ACT
from . import _ops
from .plan import CompactPolicy, LayerPlan, StepPlan, make_plan


def _rows(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return w if idx is None else w.index_select(0, idx)


def _cols(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return w if idx is None else w.index_select(1, idx)


class _Embeddings(nn.Module):
    def __init__(self, config, roberta: bool) -> None:
        super().__init__()
        pad = config.pad_token_id if roberta else None
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size, padding_idx=pad)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.roberta = roberta
        self.padding_idx = config.pad_token_id

    def sum(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """word + position + token-type embeddings, [B, S, d]."""
        B, S = input_ids.shape
        if self.roberta:
            m = input_ids.ne(self.padding_idx).to(torch.int64)
            pos = torch.cumsum(m, dim=1) * m + self.padding_idx
        else:
            pos = torch.arange(S, device=input_ids.device)[None, :]
        if token_type_ids is None:
            tt = self.token_type_embeddings.weight[0]
            e = self.word_embeddings(input_ids) + tt
        else:
            e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return e + self.position_embeddings(pos)


class _SelfAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        d = config.hidden_size
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _DenseLN(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _DenseLN(config.hidden_size, config.hidden_size, config.layer_norm_eps)


class _Intermediate(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseLN(config.intermediate_size, config.hidden_size, config.layer_norm_eps)


class _Encoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


class _Pooler(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class CoFiEncoder(nn.Module):
    """BertModel / RobertaModel with CoFi masks. Submodules and parameter names are HF's
    (``embeddings.*``, ``encoder.layer.{i}.attention.self.query`` ..., ``pooler.dense``)."""

    def __init__(self, config, roberta: bool = False, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config, roberta)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config) if add_pooling_layer else None
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACT:
            raise ValueError(f"cofi.models: hidden_act {act!r} is not supported (one of {sorted(_ACT)})")
        self.activation = _ACT[act]
        self._arange_cache: dict[tuple[str, int], torch.Tensor] = {}

    def _all_units(self, device: torch.device) -> torch.Tensor:
        key = (str(device), self.config.intermediate_size)
        t = self._arange_cache.get(key)
        if t is None:
            t = self._arange_cache[key] = torch.arange(self.config.intermediate_size, device=device)
        return t

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, masks: Masks | None = None, backend: str = "compact",
                output_hidden_states: bool = False, policy: CompactPolicy = CompactPolicy()
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, StepPlan]:
        """input_ids [B, S]; attention_mask [B, S] (1 = token) or None.

        Returns (sequence output [B, S, d'], hidden states (embedding output + one per layer, each
        [B, S, d']) or None, plan). d' = d except in compact mode with gathered hidden dims, where
        the live dims are ``plan.hidden_idx``.
        """
        if backend not in ("compact", "dense"):
            raise ValueError(f"cofi.models: backend must be 'compact' or 'dense', got {backend!r}")
        cfg = self.config
        plan = make_plan(masks, cfg.num_hidden_layers, self.num_heads, self.head_dim, cfg.intermediate_size,
                         compact=(backend == "compact"), device=input_ids.device, policy=policy)
        dense = backend == "dense"
        ln = _ops.masked_layer_norm_ref if dense else _ops.masked_layer_norm
        m = masks if masks is not None else Masks()
        hk = plan.hidden_idx
        zh = m.hidden if hk is None or m.hidden is None else m.hidden.index_select(0, hk)
        p_hid = cfg.hidden_dropout_prob if self.training else 0.0
        p_att = cfg.attention_probs_dropout_prob if self.training else 0.0
        kpm = attention_mask.to(torch.bool) if attention_mask is not None else None
        if hk is not None and hk.numel() == 0:
            # No live hidden dim: every LayerNorm output is multiplied by hidden_z = 0, so the
            # embedding output and every layer output are 0 whatever the sublayers compute (dense
            # mode gets the same zeros); at width 0 they are empty.
            B, S = input_ids.shape
            x = self.embeddings.word_embeddings.weight.new_zeros(B, S, 0)
            return x, ((x,) * (cfg.num_hidden_layers + 1) if output_hidden_states else None), plan

        e = self.embeddings.sum(input_ids, token_type_ids)
        emb_ln = self.embeddings.LayerNorm
        if hk is not None:
            e = e.index_select(-1, hk)
        x = ln(e, None, _rows(emb_ln.weight, hk), _rows(emb_ln.bias, hk), zh, emb_ln.eps)
        x = F.dropout(x, p_hid, self.training)
        states = [x] if output_hidden_states else None

        for l, layer in enumerate(self.encoder.layer):
            lp = plan.layers[l]
            if not lp.attn_skip:
                h = (self._attn_dense if dense else self._attn_compact)(layer, x, m, l, lp, hk, kpm, p_att)
                h = F.dropout(h, p_hid, self.training)
                o = layer.attention.output.LayerNorm
                # under autocast h is low precision (GEMM output) and the residual stream keeps the
                # LayerNorm's dtype (fp32): the sum is taken in the stream's dtype, as in HF's BERT
                x = ln(h.to(x.dtype), x, _rows(o.weight, hk), _rows(o.bias, hk), zh, o.eps)
            elif dense:  # the reference computes the dead sublayer (output * 0) and skips only its LN
                x = x + self._attn_dense(layer, x, m, l, lp, hk, kpm, p_att)
            if not lp.ffn_skip:
                h = (self._ffn_dense if dense else self._ffn_compact)(layer, x, m, l, lp, hk)
                h = F.dropout(h, p_hid, self.training)
                o = layer.output.LayerNorm
                x = ln(h.to(x.dtype), x, _rows(o.weight, hk), _rows(o.bias, hk), zh, o.eps)
            elif dense:
                x = x + self._ffn_dense(layer, x, m, l, lp, hk)
            if states is not None:
                states.append(x)
        return x, (tuple(states) if states is not None else None), plan

    # ---------------------------------------------------------------- dense (reference) sublayers
    def _attn_dense(self, layer: _Layer, x, m: Masks, l: int, lp: LayerPlan, hk, kpm, p_att):
        sa, out = layer.attention.self, layer.attention.output.dense
        B, S, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (F.linear(x, p.weight, p.bias).view(B, S, H, D).transpose(1, 2) for p in (sa.query, sa.key, sa.value))
        hz = m.head[l] if m.head is not None else None
        ctx = _ops.masked_attention_ref(q, k, v, hz, kpm, 1.0 / math.sqrt(D), p_att)
        h = F.linear(ctx.transpose(1, 2).reshape(B, S, H * D), out.weight, out.bias)
        if m.mha is not None:
            h = h * m.mha[l]
        return h

    def _ffn_dense(self, layer: _Layer, x, m: Masks, l: int, lp: LayerPlan, hk):
        w1, w2 = layer.intermediate.dense, layer.output.dense
        iz = m.intermediate[l] if m.intermediate is not None else None
        fz = m.ffn[l] if m.ffn is not None else None
        return _ops.masked_ffn_ref(x, w1.weight, w1.bias, w2.weight, w2.bias, iz, fz, self.activation)

    # ---------------------------------------------------------------- compact sublayers
    def _attn_compact(self, layer: _Layer, x, m: Masks, l: int, lp: LayerPlan, hk, kpm, p_att):
        sa, out = layer.attention.self, layer.attention.output.dense
        B, S, _ = x.shape
        D = self.head_dim
        rows = lp.head_rows
        wo, bo = _rows(_cols(out.weight, rows), hk), _rows(out.bias, hk)
        if m.mha is not None:  # gate folded into W_O and b_O: d x H'D multiplies instead of B S x d
            g = m.mha[l]
            wo, bo = wo * g, bo * g
        if lp.n_heads == 0:  # no live head: the sublayer outputs its gated bias (as the reference)
            return bo.expand(B, S, bo.shape[0])
        Hn = lp.n_heads
        q, k, v = (F.linear(x, _cols(_rows(p.weight, rows), hk), _rows(p.bias, rows)).view(B, S, Hn, D).transpose(1, 2)
                   for p in (sa.query, sa.key, sa.value))
        hz = None
        if m.head is not None:
            hz = m.head[l] if lp.head_idx is None else m.head[l].index_select(0, lp.head_idx)
        ctx = _ops.masked_attention(q, k, v, hz, kpm, 1.0 / math.sqrt(D), p_att)
        return F.linear(ctx.transpose(1, 2).reshape(B, S, Hn * D), wo, bo)

    def _ffn_compact(self, layer: _Layer, x, m: Masks, l: int, lp: LayerPlan, hk):
        w1, w2 = layer.intermediate.dense, layer.output.dense
        iz = m.intermediate[l] if m.intermediate is not None else None
        fz = m.ffn[l] if m.ffn is not None else None
        live = lp.ffn_idx
        if live is None and (iz is not None or fz is not None):
            live = self._all_units(x.device)  # tells the op not to look at the masks on the host
        return _ops.masked_ffn(x, _cols(w1.weight, hk), w1.bias, _rows(w2.weight, hk), _rows(w2.bias, hk), iz, fz,
                               self.activation, live_idx=live)
