"""DecoderMaskSet and its projections: expected size of 0/1 keep values == the exact count, the
sparsity projection lands within one unit below the budget, the shape projection is exact and
uniform (GQA-consistent), the Lagrangian pulls toward the target, bad targets are one line."""
from __future__ import annotations

import pytest
import torch
from cofi.errors import UserError
from cofi.masks.decoder import DecoderShape, kept_structure, real_size
from cofi.masks.decoder_maskset import DecoderMaskConfig, DecoderMaskSet, DecoderTarget
from cofi.masks.decoder_projection import project_keep_to_sparsity, project_to_shape, project_to_sparsity
from transformers import LlamaConfig


def _shape(**kw) -> DecoderShape:
    base = {"vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
                "head_dim": 8, "intermediate_size": 128}
    base.update(kw)
    return DecoderShape.from_hf_config(LlamaConfig(**base))


def _random(ms: DecoderMaskSet, seed: int = 0) -> DecoderMaskSet:
    with torch.no_grad():
        ms.log_alpha.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed))
    return ms


@pytest.mark.parametrize("bias", [False, True])
def test_expected_of_binary_is_exact(bias):
    s = _shape(attention_bias=bias, mlp_bias=bias)
    ms = _random(DecoderMaskSet(DecoderMaskConfig(s)), 1)
    m = ms.deterministic("binary")
    _, sp = ms.expected_sparsity(m)
    assert float(sp) == pytest.approx(ms.real_sparsity(m), abs=1e-6)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_sparsity_projection_closest_from_below(target):
    s = _shape()
    ms = _random(DecoderMaskSet(DecoderMaskConfig(s)), 2)
    m = project_to_sparsity(ms, target)
    real = ms.real_sparsity(m)
    d = len(kept_structure(m, s)[0])
    assert target <= real <= target + 3 * d / ms.full_body + 1e-12  # within the cheapest unit still out
    assert real - target < 0.005
    keep = project_keep_to_sparsity(ms, target)
    assert all(torch.equal(keep[g], getattr(m, g) != 0) for g in keep)


def test_shape_projection_is_exact_and_uniform():
    s = _shape()
    tg = DecoderTarget(num_layers=2, hidden_size=40, num_heads=4, num_kv_heads=1, intermediate_size=50)
    ms = _random(DecoderMaskSet(DecoderMaskConfig(s), tg), 3)
    m = project_to_shape(ms)
    hid, layers = kept_structure(m, s)
    kept = [k for k in layers if k.attention]
    assert len(hid) == 40 and len(kept) == 2 and sum(k.mlp for k in layers) == 2
    assert all(len(k.q_heads) == 4 and len(k.kv_heads) == 1 and len(k.units) == 50 for k in kept)
    assert ms.real_sparsity(m) == pytest.approx(ms.target_sparsity, abs=1e-12)
    assert real_size(m, s)["body"] == tg.body_params(s)


def test_lagrangian_moves_toward_target():
    s = _shape()
    ms = DecoderMaskSet(DecoderMaskConfig(s))
    with torch.no_grad():
        ms.lambda_1.fill_(-1.0)  # the sign ascent gives lambda_1 while s < t
    loss, sp = ms.lagrangian(0.5)
    loss.backward()
    assert float(ms.lambda_1.grad) == pytest.approx(float(sp.detach()) - 0.5)
    assert float(sp.detach()) < 0.5 and float(ms.log_alpha.grad.sum()) > 0  # descent lowers log_alpha: more sparsity
    tg = DecoderMaskSet(DecoderMaskConfig(s), DecoderTarget(num_heads=4, num_kv_heads=2))
    assert tg.lambda_1.shape == (2,) and tg.target_groups == ("head", "kv")


@pytest.mark.parametrize("kw,msg", [
    ({"num_heads": 3, "num_kv_heads": 2}, "multiple of num_kv_heads"),
    ({"num_heads": 4}, "together"),
    ({"hidden_size": 65}, "hidden_size must be in"),
    ({}, "at least one"),
])
def test_bad_targets(kw, msg):
    with pytest.raises(UserError, match=msg):
        DecoderTarget(**kw).group_counts(_shape())
