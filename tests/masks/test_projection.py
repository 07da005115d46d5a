"""cofi.masks.projection: learned scores projected onto a sparsity budget (never above it, within
0.005 of it, the mask hierarchy respected, equal to a brute-force search on a tiny model) or onto
an exact target shape; the encoder count equals the folded model's."""
from __future__ import annotations

import pytest
import torch

from cofi.masks import (MaskConfig, Masks, MaskSet, TargetArchitecture, encoder_full_size, kept_units,
                        project_to_shape, project_to_sparsity, real_size, real_sparsity)
from cofi.masks.projection import _Rule, budget_params, project_keep_to_sparsity

SMALL = dict(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=128)


def _random_set(cfg: MaskConfig, seed: int, clamp_frac: float = 0.3) -> MaskSet:
    """Scores uniform in the clamp range, a fraction pinned at the bounds (as after training)."""
    ms = MaskSet(cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        la = torch.empty(ms.num_masks, dtype=torch.float64).uniform_(-4.6, 4.6, generator=g)
        pin = torch.rand(ms.num_masks, generator=g, dtype=torch.float64) < clamp_frac
        la[pin] = torch.where(torch.rand(int(pin.sum()), generator=g) < 0.5, -4.6, 4.6).to(la.dtype)
        ms.log_alpha.copy_(la)
    return ms


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.3, 0.6, 0.9, 0.95])
def test_meets_budget_from_below(seed, target):
    cfg = MaskConfig(**SMALL)
    ms = _random_set(cfg, seed)
    for mode in ("soft", "binary"):
        m = project_to_sparsity(ms, target, mode)
        s = real_sparsity(m, cfg, "encoder")
        assert target <= s <= target + 0.005, (mode, s)
        assert real_size(m, cfg, "encoder") <= budget_params(ms, target)
        la = ms.log_alpha.detach()
        for g, v in m.items():
            kept = v != 0
            want = torch.sigmoid(ms.group_view(la, g) / cfg.temperature * 0.8) if mode == "soft" else torch.ones_like(v)
            assert torch.equal(v[kept], want[kept]) and (v[~kept] == 0).all()


def test_hierarchy_and_order():
    """Within a row a dropped unit never outscores a kept one (the fill adds best-first), and
    units under a dead gate count nothing (kept_units / real_size)."""
    cfg = MaskConfig(**SMALL)
    ms = _random_set(cfg, 7, clamp_frac=0.0)  # no ties
    keep = project_keep_to_sparsity(ms, 0.8)
    la = ms.log_alpha.detach().to(torch.float64)
    for g in ("hidden", "head", "intermediate"):
        v, k = ms.group_view(la, g).reshape(-1, cfg.shape(g)[-1]), keep[g].reshape(-1, cfg.shape(g)[-1])
        for row_v, row_k in zip(v, k):
            if row_k.any() and (~row_k).any():
                assert row_v[~row_k].max() < row_v[row_k].max()
    m = project_to_sparsity(ms, 0.8, "binary")
    k = kept_units(m, cfg)
    for layer in range(cfg.num_layers):
        if not k["mha_alive"][layer]:
            assert k["heads"][layer] == 0


def test_the_rule_at_zero_shift_is_the_deterministic_op():
    for seed in range(3):
        ms = _random_set(MaskConfig(**SMALL), seed)
        keep = _Rule(ms).keep(0.0)
        det = ms.deterministic("binary")
        for g, v in det.items():
            assert torch.equal(keep[g], v != 0), g


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_no_unit_left_out_fits(target):
    """Closest from below: adding any dropped unit (that counts at all) would exceed the budget."""
    cfg = MaskConfig(num_layers=2, hidden_size=8, num_heads=2, intermediate_size=6)
    ms = _random_set(cfg, 3)
    budget = budget_params(ms, target)
    keep = project_keep_to_sparsity(ms, target)
    binary = lambda k: Masks(**{g: v.to(torch.float64) for g, v in k.items()})  # noqa: E731
    got = real_size(binary(keep), cfg, "encoder")
    assert got <= budget
    for g, v in keep.items():
        for idx in torch.nonzero(~v).tolist():
            more = {h: t.clone() for h, t in keep.items()}
            more[g][tuple(idx)] = True
            n = real_size(binary(more), cfg, "encoder")
            assert n == got or n > budget, (g, idx)


def test_encoder_count_is_the_folded_models():
    from transformers import BertConfig, BertForSequenceClassification

    from cofi.pruning import prune

    torch.manual_seed(0)
    hf = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=24,
                    max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(hf).eval()
    cfg = MaskConfig.from_hf_config(hf)
    ms = _random_set(cfg, 5)
    for target in (0.4, 0.85):
        m = project_to_sparsity(ms, target)
        compact = prune(model, m)
        assert compact.num_encoder_params() == real_size(m, cfg, "encoder")
        assert compact.sparsity() == pytest.approx(real_sparsity(m, cfg, "encoder"), abs=1e-12)


def test_exact_shape():
    cfg = MaskConfig(**SMALL)
    for seed, (d, h, f, L) in enumerate([(40, 2, 50, 3), (64, 4, 128, 4), (1, 1, 1, 1), (10, 3, 7, 2)]):
        ms = _random_set(cfg, seed)
        for mode in ("soft", "binary"):
            m = project_to_shape(ms, {"hidden": d, "head": h, "intermediate": f, "mha": L, "ffn": L}, mode)
            k = kept_units(m, cfg)
            assert k["hidden"] == d and sum(k["mha_alive"]) == L and k["mha_alive"] == k["ffn_alive"]
            assert all(x == (h if a else 0) for x, a in zip(k["heads"], k["mha_alive"]))
            assert all(x == (f if a else 0) for x, a in zip(k["ffn"], k["ffn_alive"]))
        # MaskSet.deterministic(exact_target=True) is the same projection
        tms = MaskSet(cfg, target=TargetArchitecture(hidden_size=d, num_heads=h, intermediate_size=f, num_layers=L),
                      dtype=torch.float64)
        with torch.no_grad():
            tms.log_alpha.copy_(ms.log_alpha)
        z = tms.deterministic("binary", exact_target=True)
        assert kept_units(z, cfg) == k


def test_projection_errors():
    ms = _random_set(MaskConfig(**SMALL), 0)
    with pytest.raises(ValueError, match="target_sparsity"):
        project_to_sparsity(ms, 1.0)
    with pytest.raises(ValueError, match="mode"):
        project_to_sparsity(ms, 0.5, "hard")
    with pytest.raises(ValueError, match="mha and ffn"):
        project_to_shape(ms, {"mha": 2, "ffn": 3})
