"""Exact parameter counting of a deterministic mask set (real sparsity), next to the expected one."""
from __future__ import annotations

import torch

from .config import MaskConfig
from .masks import Masks


def full_size(cfg: MaskConfig) -> int:
    """Exact prunable parameters of the unpruned encoder: per layer Q, K, V, O weights and biases
    (4 d^2 + 4 d) and the FFN (2 d F + F + d). Embeddings, LayerNorms, pooler and heads excluded.
    Equals the reference's prunable size M when F = 4 d (85,017,600 for BERT-base)."""
    L, d, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    return L * (4 * d * d + 4 * d) + L * (2 * d * F + F + d)


def expected_full_size(cfg: MaskConfig) -> float:
    """The reference's prunable size M = L (4 d^2 + 4 d) + L (2 d F + 5 d) (used by expected_size)."""
    L, d, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    return float(L * (4 * d * d + 4 * d) + L * (2 * d * F + 5 * d))


def _kept(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if t is None:
        return torch.ones(shape, dtype=torch.bool)
    return (t.detach().to("cpu") != 0).reshape(shape)


def kept_units(masks: Masks, cfg: MaskConfig) -> dict[str, object]:
    """Surviving structure of a (deterministic) mask set, as physical pruning would leave it.

    Returns hidden (int d'), heads (list per layer; 0 where the MHA gate is 0), ffn (list per layer;
    0 where the FFN gate is 0), mha_alive / ffn_alive (lists of bool: the sublayer is computed at all).
    """
    L, H, F, d = cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.hidden_size
    hid = _kept(masks.hidden, (d,))
    head = _kept(masks.head, (L, H))
    mha = _kept(masks.mha, (L,))
    inter = _kept(masks.intermediate, (L, F))
    ffn = _kept(masks.ffn, (L,))
    heads = [int(head[l].sum()) if mha[l] else 0 for l in range(L)]
    units = [int(inter[l].sum()) if ffn[l] else 0 for l in range(L)]
    return {"hidden": int(hid.sum()), "heads": heads, "ffn": units,
            "mha_alive": [bool(m) for m in mha], "ffn_alive": [bool(f) for f in ffn]}


def structure_summary(masks: Masks, cfg: MaskConfig) -> dict[str, object]:
    """``kept_units`` of the groups ``masks`` prunes, as the training log records them: hidden (if
    the hidden group is masked), heads per layer (if heads are), ffn units per layer (if FFN units are)."""
    k = kept_units(masks, cfg)
    out: dict[str, object] = {}
    if masks.hidden is not None:
        out["hidden"] = k["hidden"]
    if masks.head is not None:
        out["heads"] = k["heads"]
    if masks.intermediate is not None:
        out["ffn"] = k["ffn"]
    return out


def real_size(masks: Masks, cfg: MaskConfig, count: str = "exact") -> int:
    """Kept prunable parameters of ``masks`` (zeros = pruned).

    count="exact": what physical pruning keeps. Per layer with a live MHA gate and h heads:
    4 d' h dh (Q, K, V, O) + 3 h dh (Q, K, V biases) + d' (b_O; kept even with h = 0, since the
    masked model then still adds b_O * gate); with a live FFN gate and f units: 2 d' f + f + d'.
    count="reference": CoFi's ``calculate_model_size`` (binarised z): kept (head, hidden) pairs
    * 4 dh + kept (FFN unit, hidden) pairs * 2, no biases.
    """
    k = kept_units(masks, cfg)
    dp, dh = k["hidden"], cfg.head_dim
    if count == "reference":
        return sum(dp * h * 4 * dh for h in k["heads"]) + sum(dp * f * 2 for f in k["ffn"])
    if count != "exact":
        raise ValueError(f"cofi.masks.real_size: count must be 'exact' or 'reference', got {count!r}")
    total = 0
    for l in range(cfg.num_layers):
        if k["mha_alive"][l]:
            h = k["heads"][l]
            total += 4 * dp * h * dh + 3 * h * dh + dp
        if k["ffn_alive"][l]:
            f = k["ffn"][l]
            total += 2 * dp * f + f + dp
    return total


def real_sparsity(masks: Masks, cfg: MaskConfig, count: str = "exact") -> float:
    """1 - real_size / full size (exact count over ``full_size``; reference count over M)."""
    full = full_size(cfg) if count == "exact" else expected_full_size(cfg)
    return 1.0 - real_size(masks, cfg, count) / full
