"""masked_rms_norm: every backend vs the reference, folding to stock RMSNorm, gradients, registration,
routing, strided / empty inputs, bad inputs."""
from __future__ import annotations

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops import _backends as B
from cofi.ops.reference import masked_add_rms_norm_ref, masked_rms_norm_ref

OP = "masked_rms_norm"


def available() -> list[str]:
    x = torch.zeros(2, 3, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY[OP].impls.items() if not impl.reasons(x)]


def make(lead=(5,), d=7, dtype=torch.float64, z="mixed", residual=True, seed=0, requires_grad=True):
    """(x, residual, weight, hidden_z); z: 'mixed' (exact zeros), 'dead', 'live', None."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, res, w = r(*lead, d) * 2 + 1, (r(*lead, d) if residual else None), r(d)
    if z is None:
        hz = None
    else:
        hz = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
        if z == "mixed":
            hz[::3] = 0
        elif z == "dead":
            hz.zero_()
    out = [t.to(dtype) if t is not None else None for t in (x, res, w, hz)]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in out]


def grads(outs, ins, gs):
    return torch.autograd.grad(outs, [t for t in ins if t is not None and t.requires_grad], gs, retain_graph=True)


def _leaves(ins, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in ins]


SHAPES = [  # (lead, d, z, residual)
    ((5,), 7, "mixed", True),
    ((2, 3), 13, "mixed", False),  # 3-D input, d not a multiple of 8, no residual
    ((4,), 16, None, True),         # plain RMSNorm + residual
    ((3,), 5, "dead", True),        # every dim pruned: output 0
    ((1,), 33, "live", True),       # batch 1
    ((3,), 1, None, False),         # d = 1
]


class TestMaskedRmsNormReference:
    def test_plain_matches_torch(self):
        x, r, w, _ = make(z=None, requires_grad=False)
        torch.testing.assert_close(masked_rms_norm_ref(x, r, w, None, 1e-5),
                                   torch.nn.functional.rms_norm(x + r, (7,), w, 1e-5))

    def test_folding_gives_stock_rms_norm(self):
        """Dropping the pruned dims (hidden_z's kept values folded into the weight) gives the stock
        RMSNorm of the smaller hidden size: F.rms_norm in float64 to 1e-14, transformers' LlamaRMSNorm
        in float32 (it computes in float32 whatever the input dtype); pruned dims are 0."""
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        x, r, w, z = make((4, 3), 11, requires_grad=False)
        keep = z != 0
        y, s = masked_add_rms_norm_ref(x, r, w, z, 1e-5)
        torch.testing.assert_close(s, x * z + r, atol=0, rtol=0)
        wk = w[keep] * z[keep]
        torch.testing.assert_close(y[..., keep], torch.nn.functional.rms_norm(s[..., keep], (int(keep.sum()),), wk, 1e-5),
                                   atol=1e-14, rtol=1e-14)
        assert torch.all(y[..., ~keep] == 0)
        norm = LlamaRMSNorm(int(keep.sum()), eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(wk)
        y32 = masked_rms_norm_ref(x.float(), r.float(), w.float(), z.float(), 1e-5)
        torch.testing.assert_close(y32[..., keep], norm((x.float() * z.float() + r.float())[..., keep]),
                                   **tol(OP, "fwd", torch.float32))

    def test_live_equals_binary_mask(self):
        x, r, w, _ = make((4,), 10, requires_grad=False)
        live = torch.tensor([0, 3, 4, 8])
        z = torch.zeros(10, dtype=torch.float64).index_fill_(0, live, 1.0)
        for backend in available():
            torch.testing.assert_close(ops.masked_rms_norm(x, r, w, live=live, backend=backend),
                                       masked_rms_norm_ref(x, r, w, z), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", available())
class TestMaskedRmsNormBackends:
    @pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_vs_reference(self, backend, shape, dtype):
        lead, d, z, res = shape
        ins = make(lead, d, dtype, z, res)
        y, s = ops.masked_add_rms_norm(*ins, eps=1e-5, backend=backend)
        assert ops.last_backend(OP) == backend
        ref_ins = _leaves(ins, torch.float64)
        yr, sr = masked_add_rms_norm_ref(*ref_ins, eps=1e-5)
        torch.testing.assert_close(y.double(), yr, **tol(OP, "fwd", dtype))
        torch.testing.assert_close(s.double(), sr, **tol(OP, "fwd", dtype))
        gy, gs = torch.randn_like(yr), torch.randn_like(sr)
        for a, b in zip(grads((y, s), ins, (gy.to(dtype), gs.to(dtype))), grads((yr, sr), ref_ins, (gy, gs))):
            torch.testing.assert_close(a.double(), b, **tol(OP, "bwd", dtype))
        y1 = ops.masked_rms_norm(*ins, eps=1e-5, backend=backend)  # y only: the sum is not stored
        for a, b in zip(grads(y1, ins, gy.to(dtype)), grads(yr, ref_ins, gy)):
            torch.testing.assert_close(a.double(), b, **tol(OP, "bwd", dtype))

    def test_gradcheck(self, backend):
        fast = backend == "triton"  # interpreted Triton: one random projection
        ins = make((3,), 6, z="live")  # no exact zeros: finite differences stay on one side of the keep mask
        assert torch.autograd.gradcheck(lambda *t: ops.masked_add_rms_norm(*t, eps=1e-5, backend=backend), ins,
                                        fast_mode=fast)
        x, r, w, _ = make((3,), 6, z=None)
        assert torch.autograd.gradcheck(lambda *t: ops.masked_rms_norm(*t, None, 1e-5, backend=backend), (x, r, w),
                                        fast_mode=fast)
        x, _, w, z = make((3,), 6, z="mixed", residual=False)  # zeros held fixed, others checked
        assert torch.autograd.gradcheck(lambda *t: ops.masked_add_rms_norm(t[0], None, t[1], z.detach(), 1e-5,
                                                                           backend=backend), (x, w), fast_mode=fast)

    def test_frozen_weight_and_sum_only_gradient(self, backend):
        x, r, w, z = make((4,), 9)
        w.requires_grad_(False)
        y, s = ops.masked_add_rms_norm(x, r, w, z, backend=backend)
        yr, sr = masked_add_rms_norm_ref(x, r, w, z)
        for a, c in zip(grads(y.sum(), (x, r, z), None), grads(yr.sum(), (x, r, z), None)):
            torch.testing.assert_close(a, c)
        for a, c in zip(grads(s.sum(), (x, r, z), None), grads(sr.sum(), (x, r, z), None)):
            torch.testing.assert_close(a, c)

    def test_deterministic(self, backend):
        x, r, w, z = make((16,), 24, torch.float32)
        g = torch.randn(16, 24)
        y1 = ops.masked_rms_norm(x, r, w, z, backend=backend)
        y2 = ops.masked_rms_norm(x, r, w, z, backend=backend)
        assert torch.equal(y1, y2)
        for a, c in zip(grads(y1, (x, r, w, z), g), grads(y2, (x, r, w, z), g)):
            assert torch.equal(a, c)

    def test_strided_inputs(self, backend):
        """Non-contiguous x / residual / weight / hidden_z give the contiguous answer."""
        x, r, w, z = [t.detach() for t in make((6,), 8)]
        xs = x.t().contiguous().t()  # same values, column-major
        rs = torch.stack([r, r], -1)[..., 0]
        ws, zs = torch.stack([w, w], 1)[:, 1], torch.stack([z, z], 1)[:, 0]
        assert not (xs.is_contiguous() or rs.is_contiguous() or ws.is_contiguous() or zs.is_contiguous())
        torch.testing.assert_close(ops.masked_rms_norm(xs, rs, ws, zs, backend=backend),
                                   masked_rms_norm_ref(x, r, w, z), **tol(OP, "fwd", torch.float64))

    @pytest.mark.parametrize("masked", [True, False])
    def test_empty_batch(self, backend, masked):
        x, r, w, z = make((0, 3), 8, z="mixed" if masked else None)
        y, s = ops.masked_add_rms_norm(x, r, w, z, backend=backend)
        assert y.shape == s.shape == (0, 3, 8)
        ins = [t for t in (x, r, w, z) if t is not None]
        gs = torch.autograd.grad((y.sum() + s.sum()), ins)
        assert [tuple(g.shape) for g in gs] == [tuple(t.shape) for t in ins]
        assert all(torch.all(g == 0) for g in gs)


class TestMaskedRmsNormRegistration:
    def test_opcheck_public(self):
        x, r, w, z = make((4,), 6)
        for backend in available():
            for args in ((x, r, w, z, 1e-5, True, backend), (x, None, w, None, 1e-6, False, backend),
                         (x.detach(), r.detach(), w.detach(), z.detach(), 1e-5, False, backend)):
                torch.library.opcheck(torch.ops.cofi.masked_rms_norm.default, args)

    def test_opcheck_backward_op(self):
        x, r, w, z = [t.detach() for t in make((4,), 6)]
        _, _, rstd = torch.ops.cofi.masked_rms_norm(x, r, w, z, 1e-5, False, "reference")
        g = torch.randn_like(x)
        for gs in (None, torch.randn_like(x)):
            torch.library.opcheck(torch.ops.cofi.masked_rms_norm_backward.default,
                                  (g, gs, x, r, w, z, rstd, [True] * 4, "reference"))

    @pytest.mark.skipif("native" not in available(), reason="extension not built")
    def test_opcheck_native(self):
        x, r, w, z = [t.detach() for t in make((4,), 6)]
        torch.library.opcheck(torch.ops.cofi.masked_rms_norm_fwd_native.default, (x, r, w, z, 1e-5, True))
        _, _, rstd = torch.ops.cofi.masked_rms_norm_fwd_native(x, r, w, z, 1e-5, False)
        torch.library.opcheck(torch.ops.cofi.masked_rms_norm_bwd_native.default,
                              (torch.randn_like(x), torch.randn_like(x), x, r, w, z, rstd, [True] * 4))

    def test_compile_fullgraph(self):
        x, r, w, z = make((2, 3), 6)
        f = torch.compile(lambda *t: ops.masked_add_rms_norm(*t), fullgraph=True, backend="aot_eager")
        y, s = f(x, r, w, z)
        yr, sr = masked_add_rms_norm_ref(x, r, w, z)
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(s, sr)
        (y.sum() + s.sum()).backward()
        assert x.grad is not None and z.grad is not None


class TestMaskedRmsNormValidation:
    @pytest.mark.parametrize("bad,match", [
        (lambda a: a.update(residual=torch.randn(3, 5, dtype=torch.float64)), "residual must have shape"),
        (lambda a: a.update(weight=torch.randn(5, dtype=torch.float64)), "weight must have shape"),
        (lambda a: a.update(weight=torch.randn(6, dtype=torch.float32)), "weight dtype"),
        (lambda a: a.update(hidden_z=torch.ones(2, dtype=torch.float64)), "hidden_z must have shape"),
        (lambda a: a.update(eps=-1.0), "eps must be >= 0"),
        (lambda a: a.update(eps=float("nan")), "eps must be a number"),
        (lambda a: a.update(x=torch.zeros(3, 0, dtype=torch.float64)), "x must have a non-empty"),
        (lambda a: a.update(x="not a tensor"), "x must be a torch.Tensor"),
        (lambda a: a.update(x=torch.zeros(3, 6, dtype=torch.int64)), "x dtype"),
        (lambda a: a.update(hidden_z=None, live=torch.tensor([0, 6])), r"live must hold indices in \[0, 6\)"),
        (lambda a: a.update(hidden_z=None, live=torch.tensor([1, 1])), "live must hold unique"),
        (lambda a: a.update(hidden_z=None, live=torch.tensor([1.0])), "live dtype"),
        (lambda a: a.update(live=torch.tensor([1])), "hidden_z or live, not both"),
    ])
    def test_bad_inputs(self, bad, match):
        x, r, w, z = [t.detach() for t in make((3,), 6)]
        args = dict(x=x, residual=r, weight=w, hidden_z=z)
        bad(args)
        with pytest.raises((ValueError, TypeError), match=match):
            ops.masked_rms_norm(**args)

    @pytest.mark.skipif("native" not in available(), reason="extension not built")
    def test_native_refuses_bad_eps(self):
        x = torch.zeros(2, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match="eps"):
            torch.ops.cofi.masked_rms_norm_fwd_native(x, None, torch.ones(4, dtype=torch.float64), None, -1.0, False)


class TestMaskedRmsNormRouting:
    def test_forced_backends_recorded(self):
        x, r, w, z = [t.detach() for t in make((3,), 6)]
        for backend in available():
            ops.masked_rms_norm(x, r, w, z, backend=backend)
            assert ops.last_backend(OP) == backend

    def test_auto_prefers_native_on_cpu(self):
        x, r, w, z = [t.detach() for t in make((3,), 6)]
        ops.masked_rms_norm(x, r, w, z)
        assert ops.last_backend(OP) == ("native" if "native" in available() else "reference")

    def test_half_on_cpu_uses_reference(self):
        x, r, w, z = [t.detach().bfloat16() for t in make((3,), 6)]
        y = ops.masked_rms_norm(x, r, w, z)
        assert ops.last_backend(OP) == "reference" and y.dtype == torch.bfloat16
        want = masked_rms_norm_ref(*[t.float() for t in (x, r, w, z)])
        torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", available())
def test_autocast_fp32_policy(backend):
    """Under bf16 autocast the op runs in float32 (masked_layer_norm's policy): float32 outputs equal
    to the reference on the fp32 copies, gradients back in each input's dtype."""
    x, r, w, z = make((4,), 10, torch.float32)
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y, s = ops.masked_add_rms_norm(xb, r, w, z, backend=backend)
    assert y.dtype == s.dtype == torch.float32
    yr, sr = masked_add_rms_norm_ref(xb.detach().float(), r.detach(), w.detach(), z.detach())
    torch.testing.assert_close(y, yr, **tol(OP, "fwd", torch.float32))
    torch.testing.assert_close(s, sr, **tol(OP, "fwd", torch.float32))
    gs = torch.autograd.grad((y.sum() + s.sum()), (xb, r, w, z))
    assert [g.dtype for g in gs] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]


@pytest.mark.cuda
class TestMaskedRmsNormGpu:
    @pytest.mark.parametrize("backend", ["triton"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_vs_fp32_reference(self, backend, dtype):
        ins = [t.detach().cuda() for t in make((64,), 576, torch.float32)]
        y = ops.masked_rms_norm(*[t.to(dtype) for t in ins], backend=backend)
        yr = masked_rms_norm_ref(*[t.double() for t in ins]).float()
        ylow = masked_rms_norm_ref(*[t.to(dtype) for t in ins]).float()
        assert (y.float() - yr).abs().max() <= 2 * (ylow - yr).abs().max() + 1e-5
