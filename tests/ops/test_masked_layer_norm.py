"""masked_layer_norm: every backend vs the reference, gradients, registration, routing, bad inputs."""
from __future__ import annotations

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops import _backends as B
from cofi.ops.reference import masked_layer_norm_ref

OP = "masked_layer_norm"


def available() -> list[str]:
    x = torch.zeros(2, 3, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY[OP].impls.items() if not impl.reasons(x)]


def make(lead=(5,), d=7, dtype=torch.float64, z="mixed", residual=True, seed=0, requires_grad=True):
    """(x, residual, weight, bias, hidden_z); z: 'mixed' (exact zeros), 'dead', 'live', None."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, res, w, b = r(*lead, d) * 2 + 1, (r(*lead, d) if residual else None), r(d), r(d)
    if z is None:
        hz = None
    else:
        hz = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
        if z == "mixed":
            hz[::3] = 0
        elif z == "dead":
            hz.zero_()
    out = [t.to(dtype) if t is not None else None for t in (x, res, w, b, hz)]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in out]


def grads(y, ins, g):
    return torch.autograd.grad(y, [t for t in ins if t is not None and t.requires_grad], g)


SHAPES = [  # (lead, d, z, residual)
    ((5,), 7, "mixed", True),
    ((2, 3), 13, "mixed", False),  # 3-D input, d not a multiple of 8, no residual
    ((4,), 16, None, True),         # plain LayerNorm + residual
    ((3,), 5, "dead", True),        # every dim pruned: output 0
    ((1,), 33, "live", True),       # batch 1
    ((3,), 1, None, False),         # d = 1
]


class TestMaskedLayerNormReference:
    def test_plain_matches_torch(self):
        x, r, w, b, _ = make(z=None, requires_grad=False)
        torch.testing.assert_close(masked_layer_norm_ref(x, r, w, b, None, 1e-5),
                                   torch.nn.functional.layer_norm(x + r, (7,), w, b, 1e-5))

    def test_kept_dims_match_layer_norm_of_kept(self):
        x, r, w, b, z = make(requires_grad=False)
        keep = z != 0
        y = masked_layer_norm_ref(x, r, w, b, z)
        v = (x * z + r)[:, keep]
        want = torch.nn.functional.layer_norm(v, (int(keep.sum()),), w[keep], b[keep], 1e-12) * z[keep]
        torch.testing.assert_close(y[:, keep], want)
        assert torch.all(y[:, ~keep] == 0)


@pytest.mark.parametrize("backend", available())
class TestMaskedLayerNormBackends:
    @pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_vs_reference(self, backend, shape, dtype):
        lead, d, z, res = shape
        ins = make(lead, d, dtype, z, res)
        y = ops.masked_layer_norm(*ins, eps=1e-5, backend=backend)
        assert ops.last_backend(OP) == backend
        ref_ins = [t.detach().double().requires_grad_() if t is not None else None for t in ins]
        yr = masked_layer_norm_ref(*ref_ins, eps=1e-5)
        torch.testing.assert_close(y.double(), yr, **tol(OP, "fwd", dtype))
        g = torch.randn_like(yr)
        for a, b in zip(grads(y, ins, g.to(dtype)), grads(yr, ref_ins, g)):
            torch.testing.assert_close(a.double(), b, **tol(OP, "bwd", dtype))

    def test_gradcheck(self, backend):
        fast = backend == "triton"  # interpreted Triton: one random projection
        ins = make((3,), 6, z="live")  # no exact zeros: finite differences stay on one side of the keep mask
        assert torch.autograd.gradcheck(lambda *t: ops.masked_layer_norm(*t, eps=1e-5, backend=backend), ins,
                                        fast_mode=fast)
        x, r, w, b, _ = make((3,), 6, z=None)
        assert torch.autograd.gradcheck(lambda *t: ops.masked_layer_norm(*t, None, 1e-5, backend=backend), (x, r, w, b),
                                        fast_mode=fast)
        x, _, w, b, z = make((3,), 6, z="mixed", residual=False)  # zeros held fixed, others checked
        assert torch.autograd.gradcheck(lambda *t: ops.masked_layer_norm(t[0], None, t[1], t[2], z.detach(), 1e-5,
                                                                         backend=backend), (x, w, b),
                                        fast_mode=fast)

    def test_frozen_affine(self, backend):
        x, r, w, b, z = make((4,), 9)
        w.requires_grad_(False), b.requires_grad_(False)
        y = ops.masked_layer_norm(x, r, w, b, z, backend=backend)
        yr = masked_layer_norm_ref(x, r, w, b, z)
        for a, c in zip(torch.autograd.grad(y.sum(), (x, r, z)), torch.autograd.grad(yr.sum(), (x, r, z))):
            torch.testing.assert_close(a, c)

    def test_deterministic(self, backend):
        x, r, w, b, z = make((16,), 24, torch.float32)
        g = torch.randn(16, 24)
        y1 = ops.masked_layer_norm(x, r, w, b, z, backend=backend)
        y2 = ops.masked_layer_norm(x, r, w, b, z, backend=backend)
        assert torch.equal(y1, y2)
        for a, c in zip(grads(y1, (x, r, w, b, z), g), grads(y2, (x, r, w, b, z), g)):
            assert torch.equal(a, c)


class TestMaskedLayerNormRegistration:
    def test_opcheck_public(self):
        x, r, w, b, z = make((4,), 6)
        for backend in available():
            for args in ((x, r, w, b, z, 1e-5, backend), (x, None, w, b, None, 1e-12, backend),
                         (x.detach(), r.detach(), w.detach(), b.detach(), z.detach(), 1e-5, backend)):
                torch.library.opcheck(torch.ops.cofi.masked_layer_norm.default, args)

    def test_opcheck_backward_op(self):
        x, r, w, b, z = [t.detach() for t in make((4,), 6)]
        _, mean, rstd = torch.ops.cofi.masked_layer_norm(x, r, w, b, z, 1e-5, "reference")
        g = torch.randn_like(x)
        torch.library.opcheck(torch.ops.cofi.masked_layer_norm_backward.default,
                              (g, x, r, w, b, z, mean, rstd, 1e-5, [True] * 5, "reference"))

    @pytest.mark.skipif("native" not in available(), reason="extension not built")
    def test_opcheck_native(self):
        x, r, w, b, z = [t.detach() for t in make((4,), 6)]
        torch.library.opcheck(torch.ops.cofi.masked_layer_norm_fwd_native.default, (x, r, w, b, z, 1e-5))
        _, mean, rstd = torch.ops.cofi.masked_layer_norm_fwd_native(x, r, w, b, z, 1e-5)
        torch.library.opcheck(torch.ops.cofi.masked_layer_norm_bwd_native.default,
                              (torch.randn_like(x), x, r, w, b, z, mean, rstd, 1e-5, [True] * 5))

    def test_compile_fullgraph(self):
        x, r, w, b, z = make((2, 3), 6)
        f = torch.compile(lambda *t: ops.masked_layer_norm(*t), fullgraph=True, backend="aot_eager")
        y = f(x, r, w, b, z)
        torch.testing.assert_close(y, masked_layer_norm_ref(x, r, w, b, z))
        y.sum().backward()
        assert x.grad is not None and z.grad is not None


class TestMaskedLayerNormValidation:
    @pytest.mark.parametrize("bad,match", [
        (lambda a: a.update(residual=torch.randn(3, 5, dtype=torch.float64)), "residual"),
        (lambda a: a.update(weight=torch.randn(5, dtype=torch.float64)), "weight"),
        (lambda a: a.update(bias=torch.randn(6, dtype=torch.float32)), "bias dtype"),
        (lambda a: a.update(hidden_z=torch.ones(2, dtype=torch.float64)), "hidden_z"),
        (lambda a: a.update(eps=-1.0), "eps"),
        (lambda a: a.update(x=torch.zeros(3, 0, dtype=torch.float64)), "x must have a non-empty"),
        (lambda a: a.update(x="not a tensor"), "x must be a torch.Tensor"),
    ])
    def test_bad_inputs(self, bad, match):
        x, r, w, b, z = [t.detach() for t in make((3,), 6)]
        args = dict(x=x, residual=r, weight=w, bias=b, hidden_z=z)
        bad(args)
        with pytest.raises((ValueError, TypeError), match=match):
            ops.masked_layer_norm(**args)


class TestMaskedLayerNormRouting:
    def test_forced_backends_recorded(self):
        x, r, w, b, z = [t.detach() for t in make((3,), 6)]
        for backend in available():
            ops.masked_layer_norm(x, r, w, b, z, backend=backend)
            assert ops.last_backend(OP) == backend

    def test_auto_prefers_native_on_cpu(self):
        x, r, w, b, z = [t.detach() for t in make((3,), 6)]
        ops.masked_layer_norm(x, r, w, b, z)
        assert ops.last_backend(OP) == ("native" if "native" in available() else "reference")


@pytest.mark.cuda
class TestMaskedLayerNormGpu:
    @pytest.mark.parametrize("backend", ["native", "triton"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_vs_fp32_reference(self, backend, dtype):
        ins = [t.detach().cuda() for t in make((64,), 768, torch.float32)]
        y = ops.masked_layer_norm(*[t.to(dtype) for t in ins], backend=backend)
        yr = masked_layer_norm_ref(*[t.double() for t in ins]).float()
        ylow = masked_layer_norm_ref(*[t.to(dtype) for t in ins]).float()
        assert (y.float() - yr).abs().max() <= 2 * (ylow - yr).abs().max() + 1e-5
