"""hard_concrete_sample / keep_prob / deterministic / expected_size: every backend vs the reference."""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol

import cofi
from cofi import ops
from cofi.ops import _backends as B
from cofi.ops.reference import (
    expected_size_ref,
    hard_concrete_deterministic_ref,
    hard_concrete_keep_prob_ref,
    hard_concrete_sample_ref,
)

CPU = torch.device("cpu")


def available(op: str) -> list[str]:
    """Backends that can run float64 CPU inputs of ``op`` here (Triton only under the interpreter)."""
    x = torch.zeros(3, dtype=torch.float64)
    names = []
    for name, impl in B._REGISTRY[op].impls.items():
        args = (x, x, x, x, x) if op == "expected_size" else (x,)
        if not impl.reasons(*args):
            names.append(name)
    return names


def fresh_log_alpha(n: int, dtype=torch.float64, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    # wide spread so that both clip ends and the interior are hit
    return (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)


def bert_groups(L=2, d=12, H=3, F=10, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    return {"hidden": r(d), "head": r(L, H), "mha": r(L), "intermediate": r(L, F), "ffn": r(L)}, (L, d, H, F)


class TestHardConcreteReference:
    def test_keep_prob_matches_cofi_numbers(self):
        p = hard_concrete_keep_prob_ref(torch.tensor([math.log(100.0), 0.0, math.log(0.01)], dtype=torch.float64))
        torch.testing.assert_close(p, torch.tensor([0.998, 0.8318, 0.0471], dtype=torch.float64), atol=5e-4, rtol=0)

    def test_bert_base_full_size(self):
        ones = lambda *s: torch.ones(*s, dtype=torch.float64)  # noqa: E731
        _, s = expected_size_ref(ones(768), ones(12, 12), ones(12), ones(12, 3072), ones(12), 12, 768, 12, 3072)
        # the reference's hidden formula omits FFN biases: sparsity 0.000542 with every mask at 1
        assert abs(s.item() - 0.000542) < 1e-5
        e, s = expected_size_ref(None, ones(12, 12), ones(12), ones(12, 3072), ones(12), 12, 768, 12, 3072)
        full = 12 * 12 * 196_864 + 12 * 4_722_432
        assert full == 85_017_600
        assert abs(e.item() - (144 * 196_864 + 12 * 3072 * 1537)) < 1e-3

    def test_sampler_statistics(self):
        """Share of exact zeros and ones matches the closed form within 5 standard errors."""
        n = 200_000
        t, lo, hi = 2 / 3, -0.1, 1.1
        for la in (-1.0, 0.0, 2.0):
            log_alpha = torch.full((n,), la, dtype=torch.float64)
            z = ops.hard_concrete_sample(log_alpha, generator=torch.Generator().manual_seed(1))
            # P(z = 0) = P(s <= -l/(r-l)) with s = sigmoid((logit u + la)/t)
            p0 = 1 / (1 + math.exp(-(t * math.log((-lo) / hi) - la)))
            p1 = 1 - 1 / (1 + math.exp(-(t * math.log((1 - lo) / (hi - 1)) - la)))
            for p, got in ((p0, (z == 0).double().mean().item()), (p1, (z == 1).double().mean().item())):
                se = math.sqrt(p * (1 - p) / n)
                assert abs(got - p) < 5 * se, (la, p, got)
            keep = hard_concrete_keep_prob_ref(log_alpha[:1]).item()
            assert abs((z != 0).double().mean().item() - keep) < 5 * math.sqrt(keep * (1 - keep) / n) + 1e-6

    def test_deterministic_rounding_half_to_even(self):
        # a row whose expected zeros are exactly 0.5 -> round to 0 (Python's round)
        la = torch.tensor([[20.0, 20.0]], dtype=torch.float64)
        keep = hard_concrete_keep_prob_ref(la)
        assert keep.sum() > 1.99
        assert (hard_concrete_deterministic_ref(la, "binary") == 1).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
class TestHardConcreteBackends:
    @pytest.mark.parametrize("n", [1, 7, 1000, 4099])
    def test_sample_fwd_bwd(self, dtype, n):
        la = fresh_log_alpha(n, dtype)
        u = torch.rand(n, dtype=dtype) * (1 - 2e-6) + 1e-6
        grad = torch.randn(n, dtype=dtype)
        ref_x = la.clone().requires_grad_()
        ref = hard_concrete_sample_ref(ref_x, u)
        ref.backward(grad)
        for name in available("hard_concrete_sample"):
            x = la.clone().requires_grad_()
            z = ops.hard_concrete_sample(x, noise=u, backend=name)
            assert ops.last_backend("hard_concrete_sample") == name
            torch.testing.assert_close(z, ref, **tol("hard_concrete", "fwd", dtype), msg=lambda m: f"{name} {dtype} n={n}: {m}")
            z.backward(grad)
            torch.testing.assert_close(x.grad, ref_x.grad, **tol("hard_concrete", "bwd", dtype), msg=lambda m: f"{name} bwd: {m}")
            assert ((z == 0) | (z == 1)).any() or n < 100
            # clipped entries have zero gradient
            assert (x.grad[(z == 0) | (z == 1)] == 0).all()

    def test_keep_prob(self, dtype):
        la = fresh_log_alpha(3000, dtype)
        la[:3] = torch.tensor([50.0, -50.0, 0.0], dtype=dtype)  # clamp active at both ends
        grad = torch.randn_like(la)
        rx = la.clone().requires_grad_()
        ref = hard_concrete_keep_prob_ref(rx)
        ref.backward(grad)
        for name in available("hard_concrete_keep_prob"):
            x = la.clone().requires_grad_()
            p = ops.hard_concrete_keep_prob(x, backend=name)
            torch.testing.assert_close(p, ref, **tol("hard_concrete", "fwd", dtype))
            p.backward(grad)
            torch.testing.assert_close(x.grad, rx.grad, **tol("hard_concrete", "bwd", dtype))
            assert x.grad[0] == 0 and x.grad[1] == 0

    @pytest.mark.parametrize("shape", [(), (5,), (12, 12), (3, 97)])
    @pytest.mark.parametrize("mode", ["soft", "binary"])
    def test_deterministic(self, dtype, shape, mode):
        la = fresh_log_alpha(max(1, math.prod(shape)), dtype).reshape(shape)
        if la.dim() == 2:
            la[0, :4] = la[0, 0]  # ties: lower index is zeroed first
        rows = la.reshape(1, -1) if la.dim() < 2 else la
        ref = hard_concrete_deterministic_ref(rows, mode).reshape(shape)
        for name in available("hard_concrete_deterministic"):
            z = ops.hard_concrete_deterministic(la, mode, backend=name)
            torch.testing.assert_close(z, ref, **tol("hard_concrete", "fwd", dtype), msg=lambda m: f"{name}: {m}")

    @pytest.mark.parametrize("present", [
        ("hidden", "head", "mha", "intermediate", "ffn"),
        ("head", "intermediate"),
        ("hidden", "ffn"),
    ])
    def test_expected_size(self, dtype, present):
        groups, (L, d, H, F) = bert_groups(dtype=dtype, seed=3)
        ref_in = {k: (v.clone().requires_grad_() if k in present else None) for k, v in groups.items()}
        e_ref, s_ref = expected_size_ref(*ref_in.values(), L, d, H, F)
        (e_ref * 0.3 + s_ref * 7).backward()
        for name in available("expected_size"):
            ins = {k: (v.clone().requires_grad_() if k in present else None) for k, v in groups.items()}
            e, s = ops.expected_size(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, backend=name, **ins)
            torch.testing.assert_close(e, e_ref, **tol("expected_size", "fwd", dtype))
            torch.testing.assert_close(s, s_ref, **tol("expected_size", "fwd", dtype))
            (e * 0.3 + s * 7).backward()
            for k in present:
                torch.testing.assert_close(ins[k].grad, ref_in[k].grad, **tol("expected_size", "bwd", dtype), msg=lambda m: f"{name} {k}: {m}")


class TestHardConcreteGroups:
    def test_groups_one_call_and_generator_determinism(self):
        groups = [fresh_log_alpha(5, seed=1), fresh_log_alpha(12, seed=2).reshape(3, 4)]
        z1 = ops.hard_concrete_sample(groups, generator=torch.Generator().manual_seed(7))
        z2 = ops.hard_concrete_sample(groups, generator=torch.Generator().manual_seed(7))
        assert [z.shape for z in z1] == [(5,), (12,)]
        for a, b in zip(z1, z2):
            assert torch.equal(a, b)
        z3 = ops.hard_concrete_sample(groups, generator=torch.Generator().manual_seed(8))
        assert not torch.equal(z1[1], z3[1])

    def test_bit_exact_repeat(self):
        la = fresh_log_alpha(5000, torch.float32, seed=3)
        u = torch.rand(5000)
        a = ops.hard_concrete_sample(la, noise=u)
        b = ops.hard_concrete_sample(la, noise=u)
        assert torch.equal(a, b)


class TestHardConcreteGrad:
    @pytest.mark.parametrize("backend", ["reference", "native", "triton"])
    def test_gradcheck(self, backend):
        if backend not in available("hard_concrete_sample"):
            pytest.skip(f"{backend} not available here")
        la = torch.tensor([-0.3, 0.2, 1.1, -1.0, 0.05], dtype=torch.float64, requires_grad=True)
        u = torch.tensor([0.3, 0.6, 0.5, 0.8, 0.45], dtype=torch.float64)  # interior of the clip
        assert torch.autograd.gradcheck(lambda x: ops.hard_concrete_sample(x, noise=u, backend=backend), (la,))
        assert torch.autograd.gradcheck(lambda x: ops.hard_concrete_keep_prob(x, backend=backend), (la,))
        groups, (L, d, H, F) = bert_groups(L=2, d=3, H=2, F=3)
        ins = [groups[k].clone().requires_grad_() for k in ("hidden", "head", "mha", "intermediate", "ffn")]

        def f(h, hd, m, it, ff):
            return ops.expected_size(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, hidden=h, head=hd,
                                     mha=m, intermediate=it, ffn=ff, backend=backend)

        assert torch.autograd.gradcheck(f, tuple(ins))


class TestHardConcreteRegistration:
    def _samples(self):
        la = fresh_log_alpha(17, seed=5)
        u = torch.rand(17, dtype=torch.float64) * 0.98 + 0.01
        return la, u

    @pytest.mark.parametrize("backend", ["reference", "native"])
    def test_opcheck_public(self, backend):
        if backend not in available("hard_concrete_sample"):
            pytest.skip(f"{backend} not available")
        la, u = self._samples()
        for rg in (False, True):
            x = la.clone().requires_grad_(rg)
            torch.library.opcheck(torch.ops.cofi.hard_concrete_sample.default, (x, u, 2 / 3, -0.1, 1.1, backend))
            torch.library.opcheck(torch.ops.cofi.hard_concrete_keep_prob.default, (x, 2 / 3, -0.1, 1.1, 1e-6, backend))
        torch.library.opcheck(torch.ops.cofi.hard_concrete_deterministic.default, (la.reshape(1, -1), False, 2 / 3, -0.1, 1.1, 1e-6, backend))
        groups, (L, d, H, F) = bert_groups()
        args = [groups[k].clone().requires_grad_() for k in ("hidden", "head", "mha", "intermediate", "ffn")]
        torch.library.opcheck(torch.ops.cofi.expected_size.default, (*args, L, d, H, F, backend))
        args[2] = None
        torch.library.opcheck(torch.ops.cofi.expected_size.default, (*args, L, d, H, F, backend))

    def test_opcheck_native(self):
        if "native" not in available("hard_concrete_sample"):
            pytest.skip("native extension not built")
        la, u = self._samples()
        g = torch.randn_like(la)
        torch.library.opcheck(torch.ops.cofi.hard_concrete_sample_fwd_native.default, (la, u, 2 / 3, -0.1, 1.1))
        torch.library.opcheck(torch.ops.cofi.hard_concrete_sample_bwd_native.default, (g, la, u, 2 / 3, -0.1, 1.1))
        torch.library.opcheck(torch.ops.cofi.hard_concrete_keep_prob_fwd_native.default, (la, 2 / 3, -0.1, 1.1, 1e-6))
        torch.library.opcheck(torch.ops.cofi.hard_concrete_keep_prob_bwd_native.default, (g, la, 2 / 3, -0.1, 1.1, 1e-6))
        torch.library.opcheck(torch.ops.cofi.hard_concrete_deterministic_native.default, (la.reshape(1, -1), True, 2 / 3, -0.1, 1.1, 1e-6))
        groups, (L, d, H, F) = bert_groups()
        gs = [groups[k] for k in ("hidden", "head", "mha", "intermediate", "ffn")]
        torch.library.opcheck(torch.ops.cofi.expected_size_fwd_native.default, (*gs, L, d, H, F))
        one = torch.tensor(1.0, dtype=torch.float64)
        torch.library.opcheck(torch.ops.cofi.expected_size_bwd_native.default, (one, one, *gs, L, d, H, F))

    def test_torch_compile_fullgraph(self):
        groups, (L, d, H, F) = bert_groups()

        def step(la, u, hid, head):
            z = ops.hard_concrete_sample(la, noise=u)
            p = ops.hard_concrete_keep_prob(la)
            e, s = ops.expected_size(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, hidden=hid, head=head)
            return z.sum() + p.sum() + s

        la, u = self._samples()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(la, u, groups["hidden"], groups["head"]), step(la, u, groups["hidden"], groups["head"]))


class TestHardConcreteRouting:
    def test_forced_backends_record(self, monkeypatch):
        la = fresh_log_alpha(9)
        for name in available("hard_concrete_keep_prob"):
            with ops.use_backend(name):
                ops.hard_concrete_keep_prob(la)
            assert ops.last_backend("hard_concrete_keep_prob") == name
            monkeypatch.setenv("COFI_BACKEND", name)
            ops.hard_concrete_keep_prob(la)
            assert ops.last_backend("hard_concrete_keep_prob") == name
            monkeypatch.delenv("COFI_BACKEND")

    def test_auto_picks_native_on_cpu(self):
        ops.hard_concrete_keep_prob(fresh_log_alpha(9))
        expected = "native" if "native" in available("hard_concrete_keep_prob") else "reference"
        assert ops.last_backend("hard_concrete_keep_prob") == expected

    def test_unavailable_backend_raises_with_reasons(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ops.BackendError, match="triton.*CUDA"):
            ops.hard_concrete_keep_prob(fresh_log_alpha(4), backend="triton")

    def test_bad_backend_name(self, monkeypatch):
        with pytest.raises(ValueError, match="backend"):
            ops.hard_concrete_keep_prob(fresh_log_alpha(4), backend="fast")
        monkeypatch.setenv("COFI_BACKEND", "nope")
        with pytest.raises(ValueError, match="COFI_BACKEND"):
            ops.hard_concrete_keep_prob(fresh_log_alpha(4))

    def test_backends_report(self):
        rep = ops.backends()
        assert rep["hard_concrete_sample"]["reference"]["cpu"] == "available"
        cuda = rep["hard_concrete_sample"]["native"]["cuda"]
        assert cuda == "available" or all(isinstance(r, str) and r for r in cuda)


class TestHardConcreteBadInputs:
    def test_wrong_dtype(self):
        with pytest.raises(TypeError, match="log_alpha"):
            ops.hard_concrete_sample(torch.zeros(3, dtype=torch.int64))

    def test_nan(self):
        with pytest.raises(ValueError, match="log_alpha.*NaN"):
            ops.hard_concrete_sample(torch.tensor([0.0, float("nan")]))
        with pytest.raises(ValueError, match="log_alpha.*NaN"):
            ops.hard_concrete_keep_prob(torch.tensor([float("inf")]))

    def test_noise_shape_and_device(self):
        with pytest.raises(ValueError, match="noise"):
            ops.hard_concrete_sample(torch.zeros(3), noise=torch.rand(4))
        with pytest.raises(ValueError, match="noise.*meta"):
            ops.hard_concrete_sample(torch.zeros(3), noise=torch.rand(3, device="meta"))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="log_alpha"):
            ops.hard_concrete_keep_prob([0.0, 1.0])

    def test_bad_stretch_and_temperature(self):
        with pytest.raises(ValueError, match="temperature"):
            ops.hard_concrete_sample(torch.zeros(3), temperature=0.0)
        with pytest.raises(ValueError, match="limit"):
            ops.hard_concrete_sample(torch.zeros(3), limit_l=0.1)

    def test_deterministic_bad(self):
        with pytest.raises(ValueError, match="mode"):
            ops.hard_concrete_deterministic(torch.zeros(3), mode="hard")
        with pytest.raises(ValueError, match="log_alpha"):
            ops.hard_concrete_deterministic(torch.zeros(2, 2, 2))

    def test_expected_size_bad(self):
        with pytest.raises(ValueError, match="head.*\\(2, 3\\)"):
            ops.expected_size(num_layers=2, hidden_size=4, num_heads=3, intermediate_size=5, head=torch.ones(3, 3))
        with pytest.raises(ValueError, match="num_heads"):
            ops.expected_size(num_layers=2, hidden_size=4, num_heads=0, intermediate_size=5, head=torch.ones(2, 3))
        with pytest.raises(ValueError, match="at least one"):
            ops.expected_size(num_layers=2, hidden_size=4, num_heads=3, intermediate_size=5)

    def test_noncontiguous_ok(self):
        la = fresh_log_alpha(20, seed=9).reshape(4, 5).t()
        assert not la.is_contiguous()
        torch.testing.assert_close(ops.hard_concrete_keep_prob(la), hard_concrete_keep_prob_ref(la))


@pytest.mark.cuda
class TestHardConcreteGpu:
    @pytest.mark.parametrize("backend", ["native", "triton"])
    def test_cuda_matches_cpu_reference(self, backend):
        la = fresh_log_alpha(40_000, torch.float32, seed=11)
        u = torch.rand(40_000) * 0.998 + 0.001
        ref = hard_concrete_sample_ref(la, u)
        x = la.cuda().requires_grad_()
        z = ops.hard_concrete_sample(x, noise=u.cuda(), backend=backend)
        torch.testing.assert_close(z.cpu(), ref, atol=1e-5, rtol=1e-5)
        z.sum().backward()
        assert x.grad is not None
        torch.testing.assert_close(ops.hard_concrete_keep_prob(la.cuda(), backend=backend).cpu(),
                                   hard_concrete_keep_prob_ref(la), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ops.hard_concrete_deterministic(la[:3072].reshape(1, -1).cuda(), backend=backend).cpu(),
                                   hard_concrete_deterministic_ref(la[:3072].reshape(1, -1)), atol=1e-6, rtol=1e-5)

    def test_generator_on_device(self):
        g = torch.Generator(device="cuda").manual_seed(3)
        z = ops.hard_concrete_sample(torch.zeros(100, device="cuda"), generator=g)
        assert z.is_cuda
