"""Exact parameter counting of a deterministic mask set (real sparsity), next to the expected one."""
from __future__ import annotations

import torch

from ..vocab import GROUPS, attention_params, ffn_params, layer_params, reference_ffn_layer_params, reference_head_params
from .config import MaskConfig
from .masks import Masks


def full_size(cfg: MaskConfig) -> int:
    """Exact prunable parameters of the unpruned encoder: per layer Q, K, V, O weights and biases
    (4 d^2 + 4 d) and the FFN (2 d F + F + d). Embeddings, LayerNorms, pooler and heads excluded.
    Equals the reference's prunable size M when F = 4 d (85,017,600 for BERT-base)."""
    # one "head" of width d stands for all heads (H * head_dim = d even when H does not divide d)
    return cfg.num_layers * layer_params(cfg.hidden_size, 1, cfg.hidden_size, cfg.intermediate_size)


def encoder_full_size(cfg: MaskConfig) -> int:
    """Encoder parameters of the unpruned model counted the paper's way (docs/cofi-reference.md
    4.5): ``full_size`` plus every sublayer's LayerNorm (2 d each). What a folded model's
    ``CompactModel.sparsity()`` divides by."""
    return cfg.num_layers * layer_params(cfg.hidden_size, 1, cfg.hidden_size, cfg.intermediate_size, layer_norm=True)


def structure_size(hidden: int, heads: list[int], ffn: list[int], mha_alive: list[bool], ffn_alive: list[bool],
                   head_dim: int, layer_norm: bool = False) -> int:
    """Exact parameters of an encoder with ``hidden`` residual dims, ``heads[l]`` heads and
    ``ffn[l]`` FFN units in layer l; a sublayer whose gate is dead (``mha_alive[l]`` /
    ``ffn_alive[l]`` False) holds nothing, a live one with 0 units keeps its output bias (and
    LayerNorm with ``layer_norm``)."""
    total = 0
    for h, f, a, b in zip(heads, ffn, mha_alive, ffn_alive):
        if a:
            total += attention_params(hidden, h, head_dim, layer_norm)
        if b:
            total += ffn_params(hidden, f, layer_norm)
    return total


def reference_prunable_size(num_layers: int, hidden_size: int, intermediate_size: int) -> float:
    """The reference's prunable size M = L (4 d^2 + 4 d) + L (2 d F + 5 d) of an L-layer encoder
    (cofi.vocab's reference formulas; one head of width d per layer, exact in floats)."""
    L, d, F = num_layers, hidden_size, intermediate_size
    return L * reference_head_params(d, 1) + L * reference_ffn_layer_params(d, F)


def expected_full_size(cfg: MaskConfig) -> float:
    """The reference's prunable size M = L (4 d^2 + 4 d) + L (2 d F + 5 d) (used by expected_size)."""
    return reference_prunable_size(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)


def _kept(t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if t is None:
        return torch.ones(shape, dtype=torch.bool)
    return (t.detach().to("cpu") != 0).reshape(shape)


def kept_units(masks: Masks, cfg: MaskConfig) -> dict[str, object]:
    """Surviving structure of a (deterministic) mask set, as physical pruning would leave it.

    Returns hidden (int d'), heads (list per layer; 0 where the MHA gate is 0), ffn (list per layer;
    0 where the FFN gate is 0), mha_alive / ffn_alive (lists of bool: the sublayer is computed at all).
    """
    L = cfg.num_layers
    hid, head, mha, inter, ffn = (_kept(getattr(masks, g), cfg.shape(g)) for g in GROUPS)
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
    count="encoder": "exact" plus the LayerNorms of live sublayers: the folded model's
    ``CompactModel.num_encoder_params()`` (the paper's encoder count).
    count="reference": CoFi's ``calculate_model_size`` (binarised z): kept (head, hidden) pairs
    * 4 dh + kept (FFN unit, hidden) pairs * 2, no biases.
    """
    k = kept_units(masks, cfg)
    dp, dh = k["hidden"], cfg.head_dim
    if count == "reference":
        return sum(dp * h * 4 * dh for h in k["heads"]) + sum(dp * f * 2 for f in k["ffn"])
    if count not in ("exact", "encoder"):
        raise ValueError(f"cofi.masks.real_size: count must be 'exact', 'encoder' or 'reference', got {count!r}")
    return structure_size(dp, k["heads"], k["ffn"], k["mha_alive"], k["ffn_alive"], dh, layer_norm=count == "encoder")


def real_sparsity(masks: Masks, cfg: MaskConfig, count: str = "exact") -> float:
    """1 - real_size / full size (exact count over ``full_size``; encoder count over
    ``encoder_full_size``, equal to the folded model's ``CompactModel.sparsity()``; reference count
    over M)."""
    full = {"exact": full_size, "encoder": encoder_full_size}.get(count, expected_full_size)(cfg)
    return 1.0 - real_size(masks, cfg, count) / full
