"""Projection of a ``DecoderMaskSet``'s scores (log_alpha) onto what a run delivers, whatever the
Lagrangian reached (the decoder analogue of ``cofi.masks.projection``; docs/decoder.md).

Target shape (``project_to_shape``), uniform across layers so the fold is a stock Llama:
layers: the k layers with the highest mean (mha, ffn) score keep both gates, the others neither;
hidden: the k highest-scoring dims; per kept layer the k K/V groups of highest score
``kv[g] + mean of the m best head scores in g`` (m = heads / K/V heads), and in each kept group its
m best query heads; intermediate: the k best units per layer. Unconstrained groups follow the
deterministic rule.

Sparsity (``project_to_sparsity``): "never exceed the budget, closest from below" on the body
count (``real_size``, GQA rule included): (1) the deterministic rule on ``log_alpha + delta`` with
the largest ``delta`` whose structure fits (bisection: the kept sets grow with delta); (2) fill: the
units still out, best score first, are added one by one where they still fit. The gap left is below
the cost of the cheapest unit still out (an intermediate unit: 3 d').

Kept units take sigmoid(0.8 log_alpha / T) ("soft") or 1 ("binary"); dropped ones 0.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..vocab import decoder_attention_params, decoder_mlp_params
from .decoder import DecoderMasks

if TYPE_CHECKING:
    from .decoder_maskset import DecoderMaskSet

_GATES = ("mha", "ffn")


def _scores(ms: DecoderMaskSet) -> dict[str, torch.Tensor]:
    la = ms.log_alpha.detach().to("cpu", torch.float64)
    return {g: ms.group_view(la, g) for g in ms.cfg.groups}


def _rule_keep(ms: DecoderMaskSet, shift: float) -> dict[str, torch.Tensor]:
    """The deterministic rule on log_alpha + shift: per row the round(n - sum keep_prob) lowest dropped."""
    c = ms.cfg
    logit0 = (math.log(-c.limit_l / (c.limit_r - c.limit_l)) - math.log1p(c.limit_l / (c.limit_r - c.limit_l))) \
        * c.temperature
    out = {}
    for g, v in _scores(ms).items():
        rows = v.reshape(-1, 1) if g in _GATES else v.reshape(-1, v.shape[-1])
        p = 1.0 - torch.sigmoid(logit0 - (rows + shift)).clamp(c.eps, 1.0 - c.eps)
        zeros = torch.round(rows.shape[-1] - p.sum(-1, keepdim=True))
        order = torch.argsort(rows, dim=-1, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(rows.shape[-1]).expand_as(order))
        out[g] = (rank >= zeros).reshape(v.shape)
    return out


def mask_values(ms: DecoderMaskSet, keep: dict[str, torch.Tensor], mode: str = "soft") -> DecoderMasks:
    """Deterministic masks of the kept units (bool per group), in log_alpha's dtype and device."""
    if mode not in ("soft", "binary"):
        raise UserError(f"cofi.masks.decoder_projection: mode must be 'soft' or 'binary', got {mode!r}")
    la_all = ms.log_alpha.detach()
    out = {}
    for g in ms.cfg.groups:
        la = ms.group_view(la_all, g)
        val = torch.sigmoid(la / ms.cfg.temperature * 0.8) if mode == "soft" else torch.ones_like(la)
        out[g] = torch.where(keep[g].to(la.device), val, torch.zeros_like(val))
    return DecoderMasks(**out)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, n] -> bool, the k highest per row (ties: lower index)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[:, :k], True)


def project_keep_to_shape(ms: DecoderMaskSet) -> dict[str, torch.Tensor]:
    """Kept units (bool per group) of exactly the target shape (module docstring)."""
    if ms.target is None:
        raise UserError("cofi.masks.decoder_projection: project_to_shape needs a mask set with a target shape")
    s, counts = ms.shape, ms.target_counts
    sc = _scores(ms)
    keep = _rule_keep(ms, 0.0)
    if "hidden" in counts:
        keep["hidden"] = _top(sc["hidden"][None], counts["hidden"])[0]
    if "intermediate" in counts:
        keep["intermediate"] = _top(sc["intermediate"], counts["intermediate"])
    gates = [g for g in _GATES if g in counts]
    if gates:
        layers = _top(torch.stack([sc[g] for g in gates]).mean(0)[None], counts[gates[0]])[0]
        for g in gates:
            keep[g] = layers.clone()
    if "head" in counts or "kv" in counts:
        L, G, m = s.num_layers, s.num_kv_heads, s.group_size
        q = counts.get("head", s.num_heads)
        k = counts.get("kv", min(G, q))
        per = q // k
        head = sc.get("head", torch.zeros(L, s.num_heads, dtype=torch.float64)).reshape(L, G, m)
        best = torch.sort(head, dim=-1, descending=True, stable=True).values[..., :per].mean(-1)   # [L, G]
        kv_score = best + (sc.get("kv", 0.0))
        kv = _top(kv_score, k)                                                                       # [L, G]
        heads = _top(head.reshape(L * G, m), per).reshape(L, G, m) & kv[..., None]
        if "kv" in ms.cfg.groups:
            keep["kv"] = kv
        if "head" in ms.cfg.groups:
            keep["head"] = heads.reshape(L, s.num_heads)
    return keep


def project_to_shape(ms: DecoderMaskSet, mode: str = "soft") -> DecoderMasks:
    """Deterministic masks of exactly the target shape."""
    return mask_values(ms, project_keep_to_shape(ms), mode)


class _Counts:
    """Body parameters of a kept structure with O(1) updates of a head / group / unit / gate and
    O(L) of a hidden dim (the fill step's bookkeeping; the GQA rule as ``kept_structure``)."""

    def __init__(self, ms: DecoderMaskSet, keep: dict[str, torch.Tensor]) -> None:
        s = self.s = ms.shape
        full = {g: torch.ones(s.shape(g), dtype=torch.bool) for g in ("hidden", "head", "kv", "mha", "intermediate", "ffn")}
        k = {**full, **keep}
        self.d = int(k["hidden"].sum())
        self.head = k["head"].clone().reshape(s.num_layers, s.num_kv_heads, s.group_size)
        self.kv = k["kv"].clone()
        self.units = [int(x) for x in k["intermediate"].sum(-1)]
        self.mha, self.ffn = k["mha"].clone(), k["ffn"].clone()
        self.layer = [self._layer(l) for l in range(s.num_layers)]

    def _layer(self, l: int) -> int:
        s, d = self.s, self.d
        out = 0
        if self.mha[l]:
            live = self.head[l] & self.kv[l][:, None]
            q, k = int(live.sum()), int(live.any(-1).sum())
            if q or s.o_bias:
                out += decoder_attention_params(d, q, k, s.head_dim, s.qkv_bias, s.o_bias, norm=int(q > 0))
        if self.ffn[l] and (self.units[l] or s.mlp_bias):
            out += decoder_mlp_params(d, self.units[l], s.mlp_bias, norm=int(self.units[l] > 0))
        return out

    def size(self) -> int:
        return self.d + sum(self.layer)

    def set(self, group: str, idx: tuple[int, ...], on: bool) -> None:
        """Adds (``on``) or removes one unit; idx: its index in the group's shape."""
        s = self.s
        if group == "hidden":
            self.d += 1 if on else -1
            self.layer = [self._layer(l) for l in range(s.num_layers)]
            return
        l = idx[0]
        if group == "head":
            self.head[l, idx[1] // s.group_size, idx[1] % s.group_size] = on
        elif group == "intermediate":
            self.units[l] += 1 if on else -1
        else:
            getattr(self, group)[idx] = on
        self.layer[l] = self._layer(l)


def budget_params(ms: DecoderMaskSet, target_sparsity: float) -> int:
    """The most body parameters a model of sparsity >= ``target_sparsity`` may keep."""
    if not 0.0 <= float(target_sparsity) < 1.0:
        raise UserError(f"cofi.masks.decoder_projection: target_sparsity must be in [0, 1), got {target_sparsity!r}")
    full = ms.full_body
    return int((1.0 - float(target_sparsity)) * full + 1e-9 * full)


def project_keep_to_sparsity(ms: DecoderMaskSet, target_sparsity: float) -> dict[str, torch.Tensor]:
    """Kept units (bool per group) of the largest structure within the budget (module docstring)."""
    budget = budget_params(ms, target_sparsity)

    def size(keep: dict[str, torch.Tensor]) -> int:
        return _Counts(ms, keep).size()

    lo, hi = -60.0, 60.0
    if size(_rule_keep(ms, hi)) <= budget:
        return _rule_keep(ms, hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if size(_rule_keep(ms, mid)) <= budget else (lo, mid)
    keep = _rule_keep(ms, lo)
    counts = _Counts(ms, keep)
    sc = _scores(ms)
    cand = [(float(sc[g][idx]), g, idx) for g in ms.cfg.groups
            for idx in map(tuple, torch.nonzero(~keep[g]).tolist())]
    cand.sort(key=lambda c: -c[0])  # stable: ties keep group order, then index order
    for _, g, idx in cand:
        counts.set(g, idx, True)
        if counts.size() <= budget:
            keep[g][idx] = True
        else:
            counts.set(g, idx, False)
    assert counts.size() <= budget
    return keep


def project_to_sparsity(ms: DecoderMaskSet, target_sparsity: float, mode: str = "soft") -> DecoderMasks:
    """Deterministic masks whose real (body) sparsity is >= ``target_sparsity``, closest from below."""
    return mask_values(ms, project_keep_to_sparsity(ms, target_sparsity), mode)


def delivered_masks(ms: DecoderMaskSet, target_sparsity: float | None = None, mode: str = "soft") -> DecoderMasks:
    """What a run delivers: exactly the target shape (target-shape mode) or the sparsity projection."""
    if ms.target is not None:
        return project_to_shape(ms, mode)
    if target_sparsity is None:
        raise UserError("cofi.masks.decoder_projection: target_sparsity must be given (the mask set has no target shape)")
    return project_to_sparsity(ms, target_sparsity, mode)


__all__ = ["budget_params", "delivered_masks", "mask_values", "project_keep_to_shape", "project_keep_to_sparsity",
           "project_to_shape", "project_to_sparsity"]
