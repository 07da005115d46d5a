"""cofi.masks: config, MaskSet (sampling, expected size, Lagrangian, deterministic, target
architecture) and exact real-sparsity counting."""
from __future__ import annotations

import math

import pytest
import torch

import cofi.ops as cops
from cofi.masks import (INIT_PRESETS, MaskConfig, Masks, MaskSet, TargetArchitecture, expected_full_size, full_size,
                        kept_units, real_size, real_sparsity)

BERT_BASE = dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072)
TINY = dict(num_layers=3, hidden_size=16, num_heads=4, intermediate_size=24)


class TestConfig:
    def test_shapes_and_layout(self):
        ms = MaskSet(MaskConfig(**TINY))
        assert ms.num_masks == 16 + 12 + 3 + 72 + 3
        assert ms.log_alpha_head.shape == (3, 4) and ms.log_alpha_intermediate.shape == (3, 24)
        assert ms.log_alpha_head.data_ptr() == ms.log_alpha.data_ptr() + 16 * ms.log_alpha.element_size()

    def test_groups_subset(self):
        ms = MaskSet(MaskConfig(**TINY, groups=("intermediate", "head")))
        assert ms.cfg.groups == ("head", "intermediate") and ms.log_alpha_hidden is None
        z = ms.sample()
        assert z.hidden is None and z.mha is None and z.head.shape == (3, 4)

    def test_bad_config(self):
        with pytest.raises(ValueError, match="groups"):
            MaskConfig(**TINY, groups=("nope",))
        with pytest.raises(ValueError, match="init_mean"):
            MaskConfig(**TINY, init_mean="bogus")
        with pytest.raises(ValueError, match="num_layers"):
            MaskConfig(0, 16, 4, 24)

    def test_init_presets(self):
        torch.manual_seed(0)
        ms = MaskSet(MaskConfig(**BERT_BASE))  # default "reference": intermediate at 0, rest at 10
        assert abs(ms.log_alpha_intermediate.mean().item()) < 1e-3
        assert abs(ms.log_alpha_head.mean().item() - 10) < 1e-2
        assert ms.log_alpha.std() > 0
        ms.clamp_()
        assert ms.log_alpha.max().item() <= math.log(100) + 1e-6
        _, s = ms.expected_sparsity()
        assert abs(s.item() - 0.117) < 2e-3  # the reference's initial expected sparsity (digest 1.2)
        u = MaskSet(MaskConfig(**BERT_BASE, init_mean="uniform"))
        u.clamp_()
        assert u.expected_sparsity()[1].item() < 0.01
        assert set(INIT_PRESETS) >= {"reference", "uniform"}


class TestExpectedSize:
    def test_bert_base_full_size(self):
        cfg = MaskConfig(**BERT_BASE)
        assert full_size(cfg) == 85_017_600 and expected_full_size(cfg) == 85_017_600
        ms = MaskSet(MaskConfig(**BERT_BASE, groups=("head", "mha", "intermediate", "ffn")), dtype=torch.float64)
        ones = ms.ones()
        e, s = ms.expected_sparsity(ones)
        # without the hidden group each FFN unit is worth floor(4,722,432 / 3072) = 1,537 (reference)
        assert e.item() == pytest.approx(144 * 196_864 + 36_864 * 1_537, abs=1e-3)
        assert s.item() == pytest.approx(1 - e.item() / 85_017_600)
        full = MaskSet(cfg, dtype=torch.float64)
        e, s = full.expected_sparsity(full.ones())  # the hidden formula omits FFN biases: s = 0.0005
        assert s.item() == pytest.approx(1 - 768 * (144 * (4 * 768 * 768 + 4 * 768) / 12 / 768 + 36864 * 2) / 85_017_600)

    def test_gradient_to_log_alpha(self):
        ms = MaskSet(MaskConfig(**TINY), dtype=torch.float64)
        with torch.no_grad():
            ms.log_alpha.uniform_(-2, 2)
        _, s = ms.expected_sparsity()
        s.backward()
        assert ms.log_alpha.grad is not None and (ms.log_alpha.grad < 0).all()  # more keep -> less sparse


class TestSample:
    def test_one_fused_call_and_zeros(self):
        ms = MaskSet(MaskConfig(**TINY))
        with torch.no_grad():
            ms.log_alpha.fill_(-4.0)
        cops.reset_stats()
        z = ms.sample(generator=torch.Generator().manual_seed(0))
        assert sum(v for (op, *_), v in cops.backend_stats().items() if op == "hard_concrete_sample") == 1
        assert all((t == 0).any() for _, t in z.items() if t.numel() > 3)
        for g, t in z.items():
            assert t.shape == ms.cfg.shape(g) and t.min() >= 0 and t.max() <= 1

    def test_reproducible_and_differentiable(self):
        ms = MaskSet(MaskConfig(**TINY))
        a = ms.sample(generator=torch.Generator().manual_seed(3))
        b = ms.sample(generator=torch.Generator().manual_seed(3))
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a.items(), b.items()))
        with torch.no_grad():
            ms.log_alpha.zero_()
        z = ms.sample(generator=torch.Generator().manual_seed(1))
        sum(t.sum() for _, t in z.items()).backward()
        assert ms.log_alpha.grad.abs().sum() > 0

    def test_masks_container(self):
        cfg = MaskConfig(**TINY)
        m = Masks.ones(cfg, dtype=torch.float64)
        sd = m.state_dict()
        m2 = Masks.from_state_dict(sd)
        assert torch.equal(m2.head, m.head) and m2.detach().to(torch.float32).hidden.dtype == torch.float32
        with pytest.raises(ValueError, match="unknown"):
            Masks.from_state_dict({"bad": torch.ones(1)})


class TestLagrangian:
    def test_value_and_ascent(self):
        ms = MaskSet(MaskConfig(**TINY), dtype=torch.float64)
        with torch.no_grad():
            ms.lambda_1.fill_(0.3)
            ms.lambda_2.fill_(-0.2)
        loss, s = ms.lagrangian(0.6)
        d = s.item() - 0.6
        assert loss.item() == pytest.approx(0.3 * d - 0.2 * d * d)
        loss.backward()
        assert ms.lambda_1.grad.item() == pytest.approx(d) and ms.lambda_2.grad.item() == pytest.approx(d * d)
        ms.ascend_lambdas_()
        assert ms.lambda_1.grad.item() == pytest.approx(-d)
        opt = torch.optim.AdamW([ms.lambda_1, ms.lambda_2], lr=0.01, weight_decay=0.0)
        opt.step()
        assert ms.lambda_1.item() < 0.3  # s < t: lambda_1 is pushed down (becomes negative over time)
        with pytest.raises(ValueError, match="target"):
            ms.lagrangian()


class TestDeterministic:
    def test_rule_per_row(self):
        torch.manual_seed(0)
        ms = MaskSet(MaskConfig(**TINY), dtype=torch.float64)
        with torch.no_grad():
            ms.log_alpha.uniform_(-4, 4)
            ms.log_alpha_mha.copy_(torch.tensor([3.0, -3.0, 0.0]))
        keep = ms.keep_prob()
        for mode in ("soft", "binary"):
            z = ms.deterministic(mode)
            for l in range(3):
                nz = round(24 - keep.intermediate[l].sum().item())
                assert int((z.intermediate[l] == 0).sum()) == nz
                if nz:
                    assert z.intermediate[l][ms.log_alpha_intermediate[l].argsort()[:nz]].eq(0).all()
            # a layer gate is removed iff P(z = 0) > 0.5
            assert [bool(v != 0) for v in z.mha] == [True, False, True]
            live = z.head[z.head != 0]
            if mode == "binary":
                assert (live == 1).all()
            else:
                expect = torch.sigmoid(ms.log_alpha_head / (2 / 3) * 0.8)[z.head != 0]
                assert torch.allclose(live, expect)


class TestTargetArchitecture:
    def test_per_group_lagrangian(self):
        torch.manual_seed(0)
        cfg = MaskConfig(**TINY)
        tgt = TargetArchitecture(hidden_size=12, num_heads=2, intermediate_size=12, num_layers=2)
        ms = MaskSet(cfg, target=tgt, dtype=torch.float64)
        assert ms.target_groups == ("hidden", "head", "mha", "intermediate", "ffn")
        assert ms.lambda_1.shape == (5,)
        with torch.no_grad():
            ms.log_alpha.uniform_(-3, 3)
            ms.lambda_1.uniform_(-1, 1)
            ms.lambda_2.uniform_(0, 1)
        loss, s = ms.lagrangian(progress=0.5)
        keep = ms.keep_prob()
        want = 0.0
        rows = {"hidden": keep.hidden[None], "head": keep.head, "mha": keep.mha[None],
                "intermediate": keep.intermediate, "ffn": keep.ffn[None]}
        targets = {"hidden": 1 - 12 / 16, "head": 0.5, "mha": 1 / 3, "intermediate": 0.5, "ffn": 1 / 3}
        for i, g in enumerate(ms.target_groups):
            sr = 1 - rows[g].sum(-1) / rows[g].shape[-1]
            d = sr - 0.5 * targets[g]
            want = want + (ms.lambda_1[i] * d + ms.lambda_2[i] * d * d).mean()
        assert loss.item() == pytest.approx(want.item())
        # a global warm-up target maps to progress = target / target_sparsity
        ts = ms.target_sparsity
        assert 0 < ts < 1
        l2, _ = ms.lagrangian(0.5 * ts)
        assert l2.item() == pytest.approx(loss.item())
        loss.backward()
        assert ms.lambda_1.grad.shape == (5,) and ms.log_alpha.grad.abs().sum() > 0

    def test_exact_target_masks(self):
        torch.manual_seed(1)
        tgt = TargetArchitecture(hidden_size=10, num_heads=3, intermediate_size=7, num_layers=2)
        ms = MaskSet(MaskConfig(**TINY), target=tgt)
        with torch.no_grad():
            ms.log_alpha.uniform_(-3, 3)
        z = ms.deterministic("binary", exact_target=True)
        assert int(z.hidden.sum()) == 10 and (z.head.sum(-1) == 3).all() and (z.intermediate.sum(-1) == 7).all()
        assert int(z.mha.sum()) == 2 and int(z.ffn.sum()) == 2
        k = kept_units(z, ms.cfg)
        assert k["hidden"] == 10
        with pytest.raises(ValueError, match="exact_target"):
            MaskSet(MaskConfig(**TINY)).deterministic(exact_target=True)

    def test_size_formulas_equal_the_spelled_out_ones(self):
        # cofi.vocab's formulas give, bitwise, the counts spelled out: M = L (4 d^2 + 4 d) + L (2 d F + 5 d)
        for L, d, H, F in ((3, 16, 4, 24), (12, 768, 12, 3072), (5, 96, 3, 100), (1, 7, 7, 1)):
            cfg = MaskConfig(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F)
            assert full_size(cfg) == L * (4 * d * d + 4 * d) + L * (2 * d * F + F + d)
            m = expected_full_size(cfg)
            assert type(m) is float and m == float(L * (4 * d * d + 4 * d) + L * (2 * d * F + 5 * d))
        tgt = TargetArchitecture(hidden_size=10, num_heads=3, num_layers=2)
        ms = MaskSet(MaskConfig(**TINY), target=tgt)
        assert ms.target_counts == {"hidden": 10, "head": 3, "mha": 2, "ffn": 2}
        L, d, F = 2, 10, 24
        m = float(3 * (4 * 16 * 16 + 4 * 16) + 3 * (2 * 16 * 24 + 5 * 16))
        assert ms.target_sparsity == 1.0 - float(L * (4 * d * d + 4 * d) + L * (2 * d * F + 5 * d)) / m

    def test_bad_target(self):
        with pytest.raises(ValueError, match="hidden"):
            MaskSet(MaskConfig(**TINY), target=TargetArchitecture(hidden_size=99))


class TestRealSparsity:
    def test_all_kept_is_zero_and_matches_module_count(self):
        from transformers import BertConfig, BertModel

        c = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=24)
        bm = BertModel(c, add_pooling_layer=False)
        n = sum(p.numel() for name, p in bm.encoder.named_parameters() if "LayerNorm" not in name)
        cfg = MaskConfig(**TINY)
        assert full_size(cfg) == n
        assert real_sparsity(Masks.ones(cfg), cfg) == 0.0
        assert real_size(Masks(), cfg) == n

    def test_pruned_count(self):
        cfg = MaskConfig(**TINY)
        m = Masks.ones(cfg)
        m.hidden[:4] = 0                      # d' = 12
        m.head[0, :] = 0                      # layer 0: no head, gate alive -> only b_O
        m.mha[1] = 0                          # layer 1: attention removed
        m.head[2, :3] = 0                     # layer 2: 1 head
        m.intermediate[0, :20] = 0.5 * 0      # layer 0: 4 units
        m.ffn[2] = 0                          # layer 2: FFN removed
        dp, dh = 12, 4
        want = (dp) + (4 * dp * 1 * dh + 3 * 1 * dh + dp)                  # attention: layers 0, 2
        want += (2 * dp * 4 + 4 + dp) + (2 * dp * 24 + 24 + dp)           # FFN: layers 0, 1
        assert real_size(m, cfg) == want
        assert real_sparsity(m, cfg) == pytest.approx(1 - want / full_size(cfg))
        ref = dp * 1 * 4 * dh + dp * (4 + 24) * 2
        assert real_size(m, cfg, count="reference") == ref
        k = kept_units(m, cfg)
        assert k["heads"] == [0, 0, 1] and k["ffn"] == [4, 24, 0] and k["mha_alive"] == [True, False, True]

    def test_maskset_real_vs_expected(self):
        torch.manual_seed(0)
        ms = MaskSet(MaskConfig(**BERT_BASE))
        with torch.no_grad():
            ms.log_alpha.uniform_(-3, 3)
        _, s = ms.expected_sparsity()
        r = ms.real_sparsity()
        assert 0 < r < 1 and abs(r - s.item()) < 0.2
