"""hard_concrete_step (sample + keep-prob + expected size in one op): every backend vs the reference."""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.masks import MaskConfig, MaskSet
from cofi.ops import _backends as B
from cofi.ops.reference import expected_size_ref, hard_concrete_keep_prob_ref, hard_concrete_sample_ref

ORDER = ("hidden", "head", "mha", "intermediate", "ffn")


def available() -> list[str]:
    x = torch.zeros(3, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY["hard_concrete_step"].impls.items() if not impl.reasons(x, x)]


def layout(L, d, H, F, present, gap=0):
    """Offsets of the present groups in canonical order, ``gap`` unused elements between groups."""
    shapes = {"hidden": (d,), "head": (L, H), "mha": (L,), "intermediate": (L, F), "ffn": (L,)}
    offs, i = {}, gap
    for g in ORDER:
        if g in present:
            offs[g] = i
            i += math.prod(shapes[g]) + gap
    return offs, shapes, i


def reference(la, u, offs, shapes, L, d, H, F):
    z = hard_concrete_sample_ref(la, u)
    p = hard_concrete_keep_prob_ref(la)
    groups = {g: (p[offs[g]:offs[g] + math.prod(shapes[g])].view(shapes[g]) if g in offs else None) for g in ORDER}
    e, s = expected_size_ref(*groups.values(), L, d, H, F)
    return z, p, e, s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("present,gap", [(ORDER, 0), (("head", "intermediate"), 3), (("hidden", "mha", "ffn"), 1)])
def test_matches_reference_fwd_bwd(dtype, present, gap):
    L, d, H, F = 3, 8, 4, 16
    offs, shapes, n = layout(L, d, H, F, present, gap)
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    la = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    la[:2] = torch.tensor([40.0, -40.0])  # keep-prob clamp active at both ends
    u = (torch.rand(n, generator=g, dtype=torch.float64) * 0.998 + 0.001).to(dtype)
    w_z, w_p = torch.randn(n, dtype=dtype, generator=g), torch.randn(n, dtype=dtype, generator=g)

    def loss(out):
        z, p, e, s = out
        return (z * w_z).sum() + (p * w_p).sum() + e * 1e-4 + 3.0 * s + 2.0 * s * s

    rx = la.clone().requires_grad_()
    want = reference(rx, u, offs, shapes, L, d, H, F)
    loss(want).backward()
    names = available()
    assert "reference" in names
    for name in names:
        x = la.clone().requires_grad_()
        got = ops.hard_concrete_step(x, offs, num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F,
                                     noise=u, backend=name)
        assert ops.last_backend("hard_concrete_step") == name
        for a, b, what in zip(got, want, ("z", "keep", "expected_params", "expected_sparsity")):
            op = "hard_concrete" if what in ("z", "keep") else "expected_size"
            torch.testing.assert_close(a, b, **tol(op, "fwd", dtype), msg=lambda m: f"{name} {what}: {m}")
        loss(got).backward()
        torch.testing.assert_close(x.grad, rx.grad, **tol("expected_size", "bwd", dtype), msg=lambda m: f"{name} grad: {m}")


def test_partial_outputs_and_gradcheck():
    L, d, H, F = 2, 3, 2, 3
    offs, _, n = layout(L, d, H, F, ORDER)
    g = torch.Generator().manual_seed(4)
    la = (torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    u = torch.rand(n, generator=g, dtype=torch.float64) * 0.6 + 0.2
    for name in available():
        kw = dict(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, noise=u, backend=name)
        # only the sparsity used: grads of z and keep arrive as None
        r = ops.hard_concrete_step(la, offs, **kw)
        (gs,) = torch.autograd.grad(r.expected_sparsity, la)
        p = hard_concrete_keep_prob_ref(la)
        groups = [p[offs[k]:offs[k] + s].view(sh) for k, s, sh in
                  zip(ORDER, (d, L * H, L, L * F, L), ((d,), (L, H), (L,), (L, F), (L,)))]
        (want,) = torch.autograd.grad(expected_size_ref(*groups, L, d, H, F)[1], la)
        torch.testing.assert_close(gs, want)
        assert torch.autograd.gradcheck(lambda x: tuple(ops.hard_concrete_step(x, offs, **kw)), (la,))


def test_generator_determinism_and_same_noise_as_sample():
    L, d, H, F = 2, 4, 2, 6
    offs, _, n = layout(L, d, H, F, ORDER)
    la = torch.randn(n)
    kw = dict(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F)
    a = ops.hard_concrete_step(la, offs, generator=torch.Generator().manual_seed(3), **kw)
    b = ops.hard_concrete_step(la, offs, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a.z, b.z)
    # the same draw as hard_concrete_sample: switching the trainer to the fused op changes no run
    z = ops.hard_concrete_sample(la, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.z, z)


def test_maskset_step_matches_separate_calls():
    cfg = MaskConfig(num_layers=2, hidden_size=8, num_heads=2, intermediate_size=12)
    ms = MaskSet(cfg)
    u = torch.rand(ms.num_masks) * 0.998 + 0.001
    st = ms.step(noise=u)
    z = ms.sample(noise=u)
    for k in cfg.groups:
        torch.testing.assert_close(getattr(st.z, k), getattr(z, k))
    lag_fused, s_fused = ms.lagrangian(0.5, step=st)
    lag_sep, s_sep = ms.lagrangian(0.5)
    torch.testing.assert_close(s_fused, s_sep)
    torch.testing.assert_close(lag_fused, lag_sep)


class TestStepRegistration:
    def _args(self):
        L, d, H, F = 2, 3, 2, 4
        offs, _, n = layout(L, d, H, F, ("hidden", "head", "intermediate"), gap=1)
        la = torch.randn(n, dtype=torch.float64)
        u = torch.rand(n, dtype=torch.float64) * 0.98 + 0.01
        return la, u, [offs.get(g, -1) for g in ORDER], (L, d, H, F)

    @pytest.mark.parametrize("backend", ["reference", "native"])
    def test_opcheck_public(self, backend):
        if backend not in available():
            pytest.skip(f"{backend} not available")
        la, u, offs, sizes = self._args()
        for rg in (False, True):
            torch.library.opcheck(torch.ops.cofi.hard_concrete_step.default,
                                  (la.clone().requires_grad_(rg), u, offs, *sizes, 2 / 3, -0.1, 1.1, 1e-6, backend))

    def test_opcheck_native(self):
        if "native" not in available():
            pytest.skip("native extension not built")
        la, u, offs, sizes = self._args()
        torch.library.opcheck(torch.ops.cofi.hard_concrete_step_fwd_native.default,
                              (la, u, offs, *sizes, 2 / 3, -0.1, 1.1, 1e-6))
        keep = hard_concrete_keep_prob_ref(la)
        z = hard_concrete_sample_ref(la, u)
        one = torch.tensor(1.0, dtype=torch.float64)
        for gz, gk in ((torch.randn_like(la), None), (None, torch.randn_like(la))):
            for dt in (torch.float64, torch.float32):
                c = lambda x: None if x is None else x.to(dt)  # noqa: E731
                torch.library.opcheck(torch.ops.cofi.hard_concrete_step_bwd_native.default,
                                      (c(gz), c(gk), c(one), c(one), c(la), c(u), c(z), c(keep), offs, *sizes,
                                       2 / 3, -0.1, 1.1, 1e-6))

    def test_torch_compile_fullgraph(self):
        la, u, offs, (L, d, H, F) = self._args()
        named = {g: o for g, o in zip(ORDER, offs) if o >= 0}

        def f(x):
            r = ops.hard_concrete_step(x, named, num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, noise=u)
            return r.z.sum() + r.expected_sparsity

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(la), f(la))


class TestStepBadInputs:
    kw = dict(num_layers=2, hidden_size=3, num_heads=2, intermediate_size=4)

    def test_group_does_not_fit(self):
        with pytest.raises(ValueError, match="intermediate.*does not fit"):
            ops.hard_concrete_step(torch.zeros(10), {"intermediate": 4}, **self.kw)

    def test_overlap(self):
        with pytest.raises(ValueError, match="overlap"):
            ops.hard_concrete_step(torch.zeros(20), {"hidden": 0, "head": 2}, **self.kw)

    def test_unknown_group_and_empty(self):
        with pytest.raises(ValueError, match="unknown groups.*heads"):
            ops.hard_concrete_step(torch.zeros(20), {"heads": 0}, **self.kw)
        with pytest.raises(ValueError, match="at least one group"):
            ops.hard_concrete_step(torch.zeros(20), {}, **self.kw)

    def test_not_flat_nan_dtype_noise(self):
        with pytest.raises(ValueError, match="log_alpha"):
            ops.hard_concrete_step(torch.zeros(4, 5), {"hidden": 0}, **self.kw)
        with pytest.raises(ValueError, match="log_alpha.*NaN"):
            ops.hard_concrete_step(torch.tensor([0.0, float("nan"), 0.0]), {"hidden": 0}, **self.kw)
        with pytest.raises(TypeError, match="log_alpha"):
            ops.hard_concrete_step(torch.zeros(3, dtype=torch.int32), {"hidden": 0}, **self.kw)
        with pytest.raises(ValueError, match="noise"):
            ops.hard_concrete_step(torch.zeros(3), {"hidden": 0}, noise=torch.rand(4), **self.kw)
        with pytest.raises(ValueError, match="num_layers"):
            ops.hard_concrete_step(torch.zeros(3), {"hidden": 0}, **{**self.kw, "num_layers": 0})


@pytest.mark.cuda
def test_cuda_matches_cpu():
    L, d, H, F = 12, 768, 12, 3072
    offs, shapes, n = layout(L, d, H, F, ORDER)
    la = torch.randn(n) * 2
    u = torch.rand(n) * 0.998 + 0.001
    want = reference(la, u, offs, shapes, L, d, H, F)
    for name in ("native", "triton"):
        r = ops.hard_concrete_step(la.cuda(), offs, num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F,
                                   noise=u.cuda(), backend=name)
        for a, b in zip(r, want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-5)
