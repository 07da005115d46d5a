"""Per-step live-unit plan: which hidden dims, heads, FFN units and sublayers a step computes.

Built once per forward from the mask values with ONE device->host copy (all groups concatenated)
and ONE host->device copy (all index lists concatenated). Everything downstream uses the plan, so
the forward has no further host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..masks import Masks


@dataclass(frozen=True)
class CompactPolicy:
    """When gathering a group's live part pays. A group (per layer for heads / FFN units) is
    gathered only if its dead fraction is at least the threshold; otherwise it runs at full size
    with the mask multiplied (same math). Gathering hidden dims copies every weight matrix, so it
    needs a larger share of dead dims to pay. All zeros = always gather (used by the tests)."""

    hidden: float = 0.05
    head: float = 0.05
    ffn: float = 0.02


ALWAYS_GATHER = CompactPolicy(0.0, 0.0, 0.0)


@dataclass
class LayerPlan:
    """One layer. attn_skip / ffn_skip: the layer gate is exactly 0 (sublayer and its LayerNorm
    skipped). head_idx: live heads (None = all heads, gate multiplied densely); head_rows: the
    matching rows of Q/K/V (columns of W_O); n_heads: heads computed. ffn_idx: live FFN units (None
    = all); n_ffn: units computed."""

    attn_skip: bool = False
    head_idx: torch.Tensor | None = None
    head_rows: torch.Tensor | None = None
    n_heads: int = 0
    ffn_skip: bool = False
    ffn_idx: torch.Tensor | None = None
    n_ffn: int = 0


@dataclass
class StepPlan:
    """hidden_idx: live hidden dims (None = full width); layers: one LayerPlan per layer."""

    hidden_idx: torch.Tensor | None
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def width(self) -> int | None:
        return None if self.hidden_idx is None else int(self.hidden_idx.numel())


def make_plan(masks: Masks | None, num_layers: int, num_heads: int, head_dim: int, intermediate_size: int,
              compact: bool, device: torch.device, policy: CompactPolicy = CompactPolicy()) -> StepPlan:
    """The plan of one step. ``compact=False`` (backend="dense") only decides the sublayer skips."""
    L, H, F = num_layers, num_heads, intermediate_size
    if masks is None:
        return StepPlan(None, [LayerPlan(n_heads=H, n_ffn=F) for _ in range(L)])
    present = list(masks.items())
    host = torch.cat([t.detach().reshape(-1).to(torch.float32) for _, t in present]).cpu() if present else None
    nz: dict[str, torch.Tensor] = {}
    o = 0
    for g, t in present:
        n = t.numel()
        nz[g] = (host[o:o + n] != 0).reshape(t.shape)
        o += n

    idx_parts: list[torch.Tensor] = []  # host int64 pieces, shipped in one copy
    slots: list[tuple[object, str, int, int]] = []

    def want(obj: object, attr: str, idx: torch.Tensor) -> None:
        a = sum(p.numel() for p in idx_parts)
        idx_parts.append(idx)
        slots.append((obj, attr, a, a + idx.numel()))

    plan = StepPlan(None)
    if compact and "hidden" in nz:
        keep = nz["hidden"]
        if not bool(keep.all()) and 1.0 - keep.float().mean().item() >= policy.hidden:
            want(plan, "hidden_idx", torch.nonzero(keep).squeeze(1))
    ar = torch.arange(head_dim)
    for l in range(L):
        lp = LayerPlan(n_heads=H, n_ffn=F)
        lp.attn_skip = "mha" in nz and not bool(nz["mha"][l])
        lp.ffn_skip = "ffn" in nz and not bool(nz["ffn"][l])
        if compact and not lp.attn_skip and "head" in nz:
            keep = nz["head"][l]
            n = int(keep.sum())
            if n < H and (H - n) / H >= policy.head or n == 0:
                heads = torch.nonzero(keep).squeeze(1)
                lp.n_heads = n
                want(lp, "head_idx", heads)
                want(lp, "head_rows", (heads[:, None] * head_dim + ar[None, :]).reshape(-1))
        if compact and not lp.ffn_skip and "intermediate" in nz:
            keep = nz["intermediate"][l]
            n = int(keep.sum())
            if n < F and ((F - n) / F >= policy.ffn or n == 0):
                lp.n_ffn = n
                want(lp, "ffn_idx", torch.nonzero(keep).squeeze(1))
        plan.layers.append(lp)
    if idx_parts:
        flat = torch.cat(idx_parts)
        if device.type != "cpu":
            flat = flat.pin_memory().to(device, non_blocking=True)
        for obj, attr, a, b in slots:
            setattr(obj, attr, flat[a:b])
    return plan
