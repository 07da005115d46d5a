"""Projection of a mask set's learned scores (log_alpha) onto a budget: the deterministic masks
of a model that meets a target sparsity, or that has exactly a target shape, whatever the
Lagrangian reached (docs/design.md, "Delivering the budget").

Sparsity budget (``project_to_sparsity``): the rule is "never exceed the budget, closest from
below", counted as the folded model counts (``real_size(count="encoder")``: every live sublayer's
weights, biases and LayerNorm over the kept hidden dims). Two steps:

1. The reference's deterministic rule applied to ``log_alpha + delta`` (per row, zero the
   round(expected #zeros) lowest scores): the kept sets are nested and grow with ``delta``, and
   ``delta = 0`` is the training's own deterministic masks. Bisection finds the largest ``delta``
   whose structure fits the budget.
2. Fill: the units still dropped, best score first (ties: lower flat index), are added one by one
   where they still fit; a unit under a dead layer gate costs nothing and only counts once its gate
   is added. The gap left is below the cost of the cheapest unit still out (an FFN unit: 2 d' + 1).

Target shape (``project_to_shape``): per row, exactly the target count of the highest scores
(hidden: k dims; heads / FFN units: k per layer); layers: the k layers with the highest mean gate
score keep both sublayer gates, the others lose both. Groups without a target follow the
deterministic rule.

Kept units take the deterministic mask values: sigmoid(0.8 log_alpha / T) ("soft", the reference)
or 1 ("binary"); dropped ones 0.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..vocab import GROUPS
from .masks import Masks
from .sparsity import encoder_full_size, structure_size

if TYPE_CHECKING:
    from .maskset import MaskSet

_LAYER_GATES = ("mha", "ffn")


class _Rule:
    """The reference's deterministic rule (``cofi.ops.hard_concrete_deterministic``) applied to
    log_alpha + shift for many shifts: per row the round(n - sum keep_prob) lowest scores are
    dropped (ties: lower index first); the within-row order is computed once."""

    def __init__(self, ms: "MaskSet") -> None:
        c = ms.cfg
        la = ms.log_alpha.detach().to("cpu", torch.float64)
        xn = -c.limit_l / (c.limit_r - c.limit_l)
        self.logit0 = (math.log(xn) - math.log1p(-xn)) * c.temperature
        self.eps = c.eps
        self.rows: dict[str, torch.Tensor] = {}
        self.rank: dict[str, torch.Tensor] = {}
        self.shapes = {g: c.shape(g) for g in c.groups}
        for g in c.groups:
            v = ms.group_view(la, g)
            rows = v.reshape(-1, 1) if g in _LAYER_GATES else v.reshape(-1, v.shape[-1])
            order = torch.argsort(rows, dim=-1, stable=True)
            self.rows[g] = rows
            self.rank[g] = torch.empty_like(order).scatter_(-1, order, torch.arange(rows.shape[-1]).expand_as(order))

    def keep(self, shift: float) -> dict[str, torch.Tensor]:
        out = {}
        for g, rows in self.rows.items():
            p = 1.0 - torch.sigmoid(self.logit0 - (rows + shift)).clamp(self.eps, 1.0 - self.eps)
            zeros = torch.round(rows.shape[-1] - p.sum(-1, keepdim=True))
            out[g] = (self.rank[g] >= zeros).reshape(self.shapes[g])
        return out


class _Counts:
    """Kept-unit counts of a structure (hidden dims, heads / FFN units per layer, live gates), with
    O(L) size evaluation and O(1) updates: the fill step's bookkeeping."""

    def __init__(self, keep: dict[str, torch.Tensor], ms: "MaskSet") -> None:
        c = ms.cfg
        L = c.num_layers
        full = {g: torch.ones(c.shape(g), dtype=torch.bool) for g in GROUPS}
        k = {**full, **keep}
        self.head_dim = c.head_dim
        self.hidden = int(k["hidden"].sum())
        self.heads = [int(x) for x in k["head"].sum(-1)]
        self.units = [int(x) for x in k["intermediate"].sum(-1)]
        self.mha = [bool(x) for x in k["mha"]]
        self.ffn = [bool(x) for x in k["ffn"]]
        assert len(self.heads) == L

    def size(self) -> int:
        return structure_size(self.hidden, self.heads, self.units, self.mha, self.ffn, self.head_dim, layer_norm=True)

    def add(self, group: str, index: tuple[int, ...], n: int = 1) -> None:
        """Adds (n = 1) or removes (n = -1) one unit of ``group``; ``index[0]``: its layer (its
        position for hidden)."""
        if group == "hidden":
            self.hidden += n
        elif group == "head":
            self.heads[index[0]] += n
        elif group == "intermediate":
            self.units[index[0]] += n
        else:
            getattr(self, group)[index[0]] = n > 0


def _params(keep: dict[str, torch.Tensor], ms: "MaskSet") -> int:
    return _Counts(keep, ms).size()


def mask_values(ms: "MaskSet", keep: dict[str, torch.Tensor], mode: str = "soft") -> Masks:
    """Deterministic masks for the kept units ``keep`` (bool per group): sigmoid(0.8 log_alpha / T)
    ("soft") or 1 ("binary") where kept, 0 elsewhere; in log_alpha's dtype and device."""
    if mode not in ("soft", "binary"):
        raise ValueError(f"cofi.masks.projection: mode must be 'soft' or 'binary', got {mode!r}")
    la_all = ms.log_alpha.detach()
    out = {}
    for g in ms.cfg.groups:
        la = ms.group_view(la_all, g)
        val = torch.sigmoid(la / ms.cfg.temperature * 0.8) if mode == "soft" else torch.ones_like(la)
        out[g] = torch.where(keep[g].to(la.device), val, torch.zeros_like(val))
    return Masks(**out)


def budget_params(ms: "MaskSet", target_sparsity: float) -> int:
    """The most encoder parameters (folded model's count) a model of sparsity >= target may keep."""
    if not 0.0 <= float(target_sparsity) < 1.0:
        raise ValueError(f"cofi.masks.projection: target_sparsity must be in [0, 1), got {target_sparsity!r}")
    full = encoder_full_size(ms.cfg)
    return int((1.0 - float(target_sparsity)) * full + 1e-9 * full)


def project_keep_to_sparsity(ms: "MaskSet", target_sparsity: float) -> dict[str, torch.Tensor]:
    """Kept units (bool per group) of the largest structure within the budget (module docstring)."""
    budget = budget_params(ms, target_sparsity)
    rule = _Rule(ms)
    lo, hi = -60.0, 60.0  # log_alpha is clamped to ~[-4.6, 4.6]: everything dropped / kept
    if _params(rule.keep(hi), ms) <= budget:
        return rule.keep(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _params(rule.keep(mid), ms) <= budget:
            lo = mid
        else:
            hi = mid
    keep = rule.keep(lo)
    # fill: every unit still out, best score first
    counts = _Counts(keep, ms)
    la = ms.log_alpha.detach().to("cpu", torch.float64)
    groups = ms.cfg.groups
    flat_keep = torch.cat([keep[g].reshape(-1) for g in groups])
    out_idx = torch.nonzero(~flat_keep).flatten()
    order = out_idx[torch.argsort(-la[out_idx], stable=True)].tolist()
    size = counts.size()
    for i in order:
        g = next(g for g in reversed(groups) if ms.offsets[g][0] <= i)
        j = i - ms.offsets[g][0]
        row = (j // ms.cfg.shape(g)[-1],) if g in ("head", "intermediate") else (j,)
        counts.add(g, row)
        new = counts.size()
        if new <= budget:
            flat_keep[i] = True
            size = new
        else:
            counts.add(g, row, -1)
    assert size <= budget
    return {g: flat_keep[a:b].view(ms.cfg.shape(g)) for g, (a, b) in ms.offsets.items()}


def project_to_sparsity(ms: "MaskSet", target_sparsity: float, mode: str = "soft") -> Masks:
    """Deterministic masks of real sparsity (folded-model count) >= ``target_sparsity`` and as
    close to it as the mask groups allow (module docstring). ms: a ``cofi.masks.MaskSet``."""
    return mask_values(ms, project_keep_to_sparsity(ms, target_sparsity), mode)


def project_keep_to_shape(ms: "MaskSet", counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Kept units (bool per group) with exactly ``counts[group]`` units per row: hidden k dims,
    head / intermediate k per layer, mha / ffn (the same k for both when both are given): the k
    layers of highest mean gate score. Groups without a count follow the deterministic rule."""
    c = ms.cfg
    la = ms.log_alpha.detach().to("cpu", torch.float64)
    keep = _Rule(ms).keep(0.0)

    def top(scores: torch.Tensor, k: int) -> torch.Tensor:  # [rows, n] -> bool, k highest per row
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        out = torch.zeros_like(scores, dtype=torch.bool)
        return out.scatter_(-1, order[:, :k], True)

    for g in ("hidden", "head", "intermediate"):
        if g in counts and g in c.groups:
            v = ms.group_view(la, g)
            keep[g] = top(v.reshape(1, -1) if g == "hidden" else v, counts[g]).reshape(v.shape)
    gates = [g for g in _LAYER_GATES if g in counts and g in c.groups]
    if gates:
        ks = {counts[g] for g in gates}
        if len(ks) != 1:
            raise ValueError(f"cofi.masks.projection: mha and ffn targets must be equal (layers), got {counts}")
        score = torch.stack([ms.group_view(la, g) for g in gates]).mean(0)
        layers = top(score[None], ks.pop())[0]
        for g in gates:
            keep[g] = layers.clone()
    return keep


def project_to_shape(ms: "MaskSet", counts: dict[str, int], mode: str = "soft") -> Masks:
    """Deterministic masks of exactly the target shape ``counts`` (``project_keep_to_shape``)."""
    return mask_values(ms, project_keep_to_shape(ms, counts), mode)
