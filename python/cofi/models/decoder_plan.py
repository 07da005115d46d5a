"""Per-step live-unit plan of the masked decoder's compact backend: which hidden dims, query heads,
K/V groups, SwiGLU units and sublayers a step computes (GQA rule: ``cofi.masks.decoder``). One
device->host copy of all mask values and one host->device copy of all index lists per forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks.decoder import DecoderMasks, DecoderShape, kept_structure


@dataclass
class DecoderLayerPlan:
    """attn_skip / mlp_skip: the sublayer adds nothing (gate 0, or no unit left and no output bias).
    q_idx, q_rows: kept query heads and their q_proj rows (o_proj columns), None = all; kv_rows:
    kept K/V groups' k_proj / v_proj rows; q_to_kv: each kept query head's position among the kept
    groups; uniform: every kept group keeps the same number of query heads (SDPA enable_gqa).
    kv_idx: the kept K/V groups (None with q_idx None). unit_idx: kept SwiGLU units (None = all).
    n_q / n_units: counts computed."""

    attn_skip: bool = False
    q_idx: torch.Tensor | None = None
    q_rows: torch.Tensor | None = None
    kv_idx: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None
    q_to_kv: torch.Tensor | None = None
    uniform: bool = True
    n_q: int = 0
    mlp_skip: bool = False
    unit_idx: torch.Tensor | None = None
    n_units: int = 0


@dataclass
class DecoderPlan:
    """hidden_idx: kept hidden dims when some are pruned (the compact residual stream's width), else
    None; layers: one DecoderLayerPlan per layer."""

    layers: list[DecoderLayerPlan] = field(default_factory=list)
    hidden_idx: torch.Tensor | None = None


def _rows(idx: list[int], width: int) -> torch.Tensor:
    t = torch.tensor(idx, dtype=torch.int64)
    return (t[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def make_decoder_plan(masks: DecoderMasks | None, shape: DecoderShape, device: torch.device) -> DecoderPlan:
    """The plan of one step; a group left whole (all kept) is not gathered."""
    s = shape
    L, H, F, D = s.num_layers, s.num_heads, s.intermediate_size, s.head_dim
    if masks is None:
        return DecoderPlan([DecoderLayerPlan(n_q=H, n_units=F) for _ in range(L)])
    present = list(masks.items())
    host = DecoderMasks()
    if present:
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for _, t in present]).cpu()
        o = 0
        for g, t in present:
            setattr(host, g, flat[o:o + t.numel()].reshape(t.shape))
            o += t.numel()
    hid, kept = kept_structure(host, s)
    parts: list[torch.Tensor] = []
    slots: list[tuple[object, str, int, int]] = []

    def want(lp: object, attr: str, t: torch.Tensor) -> None:
        a = sum(p.numel() for p in parts)
        parts.append(t)
        slots.append((lp, attr, a, a + t.numel()))

    plan = DecoderPlan()
    if len(hid) < s.hidden_size:
        want(plan, "hidden_idx", torch.tensor(hid, dtype=torch.int64))
    for k in kept:
        lp = DecoderLayerPlan(attn_skip=not k.attention, n_q=len(k.q_heads), mlp_skip=not k.mlp,
                              n_units=len(k.units))
        if k.attention and 0 < len(k.q_heads) < H:
            counts = [k.q_to_kv.count(i) for i in range(len(k.kv_heads))]
            lp.uniform = len(set(counts)) == 1
            want(lp, "q_idx", torch.tensor(k.q_heads, dtype=torch.int64))
            want(lp, "q_rows", _rows(k.q_heads, D))
            want(lp, "kv_idx", torch.tensor(k.kv_heads, dtype=torch.int64))
            want(lp, "kv_rows", _rows(k.kv_heads, D))
            if not lp.uniform:
                want(lp, "q_to_kv", torch.tensor(k.q_to_kv, dtype=torch.int64))
        if k.mlp and 0 < len(k.units) < F:
            want(lp, "unit_idx", torch.tensor(k.units, dtype=torch.int64))
        plan.layers.append(lp)
    if parts:
        flat_idx = torch.cat(parts)
        if device.type != "cpu":
            flat_idx = flat_idx.pin_memory().to(device, non_blocking=True)
        for lp, attr, a, b in slots:
            setattr(lp, attr, flat_idx[a:b])
    return plan


__all__ = ["DecoderLayerPlan", "DecoderPlan", "make_decoder_plan"]
