"""masked_ffn: every backend vs the reference, gradients, registration, routing, bad inputs."""
from __future__ import annotations

import pytest
import torch
from _tolerances import tol

import cofi
from cofi import ops
from cofi.ops import _backends as B
from cofi.ops.reference import masked_ffn_ref

OP = "masked_ffn"
ACTS = ("gelu", "gelu_tanh", "relu")


def available() -> list[str]:
    x = torch.zeros(2, 3, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY[OP].impls.items() if not impl.reasons(x)]


def make(lead=(5,), d=7, F=6, dtype=torch.float64, z="mixed", m=0.7, seed=0, requires_grad=True):
    """(x, w1, b1, w2, b2, int_z, mlp_z); z: 'mixed' (some exact zeros), 'dead', 'live', None."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w1, b1, w2, b2 = r(*lead, d), r(F, d) * 0.5, r(F), r(d, F) * 0.5, r(d)
    if z is None:
        int_z = None
    else:
        int_z = torch.rand(F, generator=g, dtype=torch.float64) + 0.1
        if z == "mixed":
            int_z[::3] = 0
        elif z == "dead":
            int_z.zero_()
    mlp_z = None if m is None else torch.tensor(m, dtype=torch.float64)
    out = [t.to(dtype) if t is not None else None for t in (x, w1, b1, w2, b2, int_z, mlp_z)]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in out]


def grads(y, ins, g):
    live = [t for t in ins if t is not None and t.requires_grad]
    return torch.autograd.grad(y, live, g)


SHAPES = [  # (lead, d, F, z, m)
    ((5,), 7, 6, "mixed", 0.7),
    ((2, 3), 9, 13, "mixed", None),  # 3-D input, d not a multiple of 8
    ((4,), 8, 0, None, 0.5),          # F = 0
    ((3,), 5, 6, "dead", 1.3),        # all units dead
    ((1,), 16, 10, "live", None),     # batch 1, every unit live
    ((6,), 3, 4, None, None),         # no masks at all
    ((4,), 6, 5, "mixed", 0.0),       # mlp_z == 0: skipped, exact d mlp_z
]


class TestMaskedFfnReference:
    def test_matches_dense_formula(self):
        x, w1, b1, w2, b2, z, m = make(requires_grad=False)
        y = masked_ffn_ref(x, w1, b1, w2, b2, z, m)
        want = m * ((torch.nn.functional.gelu(x @ w1.T + b1) * z) @ w2.T + b2)
        torch.testing.assert_close(y, want)

    def test_dead_unit_gate_gradient_is_zero(self):
        ins = make()
        y = masked_ffn_ref(*ins)
        (dz,) = torch.autograd.grad(y.sum(), ins[5])
        assert torch.all(dz[::3] == 0) and torch.all(dz[1::3] != 0)


@pytest.mark.parametrize("backend", available())
class TestMaskedFfnBackends:
    @pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    def test_vs_reference(self, backend, shape, dtype):
        lead, d, F, z, m = shape
        ins = make(lead, d, F, dtype, z, m)
        for act in (ACTS if dtype == torch.float64 else ("gelu",)):
            y = ops.masked_ffn(*ins, activation=act, backend=backend)
            assert ops.last_backend(OP) == backend
            ref_ins = [t.detach().double().requires_grad_() if t is not None else None for t in ins]
            yr = masked_ffn_ref(*ref_ins, activation=act)
            torch.testing.assert_close(y.double(), yr, **tol(OP, "fwd", dtype))
            g = torch.randn_like(yr)
            for a, b in zip(grads(y, ins, g.to(dtype)), grads(yr, ref_ins, g)):
                torch.testing.assert_close(a.double(), b, **tol(OP, "bwd", dtype))

    def test_live_idx_matches_int_z(self, backend):
        ins = make((4,), 6, 9, dtype=torch.float64, z="mixed")
        live = torch.nonzero(ins[5].detach()).squeeze(1)
        y1 = ops.masked_ffn(*ins, backend=backend)
        y2 = ops.masked_ffn(*ins, backend=backend, live_idx=live)
        torch.testing.assert_close(y1, y2)
        g = torch.randn_like(y1)
        for a, b in zip(grads(y1, ins, g), grads(y2, ins, g)):
            torch.testing.assert_close(a, b)

    def test_gradcheck(self, backend):
        ins = make((3,), 5, 4, z="live", m=0.8)  # no exact zeros: finite differences stay on one branch
        fast = backend == "triton"  # interpreted Triton: one random projection keeps this under a few seconds
        for act in (ACTS if not fast else ("gelu",)):
            assert torch.autograd.gradcheck(lambda *t: ops.masked_ffn(*t, activation=act, backend=backend), ins,
                                            fast_mode=fast)
        ins = make((3,), 5, 4, z=None, m=None)
        assert torch.autograd.gradcheck(lambda *t: ops.masked_ffn(*t, backend=backend), ins[:5], fast_mode=fast)

    def test_gradcheck_mlp_zero(self, backend):
        x, w1, b1, w2, b2, z, m = make((3,), 5, 4, z="live", m=0.0)
        assert torch.autograd.gradcheck(lambda mm: ops.masked_ffn(x.detach(), w1.detach(), b1.detach(), w2.detach(),
                                                                  b2.detach(), z.detach(), mm, backend=backend), (m,))

    def test_needs_input_grad_frozen_weights(self, backend):
        x, w1, b1, w2, b2, z, m = make((4,), 6, 5)
        for t in (w1, b1, w2, b2):
            t.requires_grad_(False)
        y = ops.masked_ffn(x, w1, b1, w2, b2, z, m, backend=backend)
        gx, gz, gm = torch.autograd.grad(y.sum(), (x, z, m))
        yr = masked_ffn_ref(x, w1, b1, w2, b2, z, m)
        for a, b in zip((gx, gz, gm), torch.autograd.grad(yr.sum(), (x, z, m))):
            torch.testing.assert_close(a, b)

    def test_noncontiguous_input(self, backend):
        x, w1, b1, w2, b2, z, m = make((6,), 8, 5, requires_grad=False)
        xt = torch.randn(8, 6, dtype=torch.float64).t()
        torch.testing.assert_close(ops.masked_ffn(xt, w1, b1, w2, b2, z, m, backend=backend),
                                   masked_ffn_ref(xt, w1, b1, w2, b2, z, m))


class TestMaskedFfnRegistration:
    def test_opcheck_public(self):
        x, w1, b1, w2, b2, z, m = make((4,), 6, 5)
        live = torch.nonzero(z.detach()).squeeze(1)
        for backend in available():
            cases = ((x, w1, b1, w2, b2, z, m, None, 0, backend), (x, w1, b1, w2, b2, None, None, None, 1, backend),
                     (x, w1, b1, w2, b2, z, m, live, 2, backend),
                     (x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), z.detach(), None, None, 0,
                      backend))
            for args in (cases if backend != "triton" else cases[:1]):  # interpreted Triton is slow
                torch.library.opcheck(torch.ops.cofi.masked_ffn.default, args)

    def test_opcheck_backward_op(self):
        x, w1, b1, w2, b2, z, m = [t.detach() for t in make((4,), 6, 5)]
        _, h = torch.ops.cofi.masked_ffn(x, w1, b1, w2, b2, z, m, None, 0, "reference")
        g = torch.randn(4, 6, dtype=torch.float64)
        torch.library.opcheck(torch.ops.cofi.masked_ffn_backward.default,
                              (g, x, w1, b1, w2, b2, z, m, None, h, 0, [True] * 7, "reference"))

    @pytest.mark.skipif("native" not in available(), reason="extension not built")
    def test_opcheck_native(self):
        x, w1, b1, w2, b2, z, m = [t.detach() for t in make((4,), 6, 5)]
        live = torch.nonzero(z).squeeze(1)
        torch.library.opcheck(torch.ops.cofi.masked_ffn_fwd_native.default, (x, w1, b1, w2, b2, z, m, live, 0))
        y, h = torch.ops.cofi.masked_ffn_fwd_native(x, w1, b1, w2, b2, z, m, live, 0)
        g = torch.randn_like(y).t().contiguous().t()
        torch.library.opcheck(torch.ops.cofi.masked_ffn_bwd_native.default,
                              (g.contiguous(), x, w1, b1, w2, b2, z, m, live, h, 0, [True] * 7))

    def test_compile_fullgraph(self):
        x, w1, b1, w2, b2, z, m = make((2, 3), 6, 5)
        f = torch.compile(lambda *t: ops.masked_ffn(*t), fullgraph=True, backend="aot_eager")
        y = f(x, w1, b1, w2, b2, z, m)
        torch.testing.assert_close(y, masked_ffn_ref(x, w1, b1, w2, b2, z, m))
        y.sum().backward()
        assert x.grad is not None and w1.grad is not None and z.grad is not None


class TestMaskedFfnValidation:
    @pytest.mark.parametrize("bad,match", [
        (lambda a: a.update(x=torch.randn(3, 5, dtype=torch.float64)), "x must have last dim"),
        (lambda a: a.update(w1=torch.randn(5, 6, 1, dtype=torch.float64)), "w1"),
        (lambda a: a.update(b1=torch.randn(4, dtype=torch.float64)), "b1"),
        (lambda a: a.update(w2=torch.randn(5, 6, dtype=torch.float64)), "w2"),
        (lambda a: a.update(b2=torch.randn(5, dtype=torch.float64)), "b2"),
        (lambda a: a.update(b2=torch.randn(6, dtype=torch.float32)), "b2 dtype"),
        (lambda a: a.update(int_z=torch.ones(4, dtype=torch.float64)), "int_z"),
        (lambda a: a.update(mlp_z=torch.ones(2, dtype=torch.float64)), "mlp_z"),
        (lambda a: a.update(live_idx=torch.zeros(2, dtype=torch.int32)), "live_idx"),
        (lambda a: a.update(activation="swish"), "activation"),
        (lambda a: a.update(x=torch.zeros(3, 6, dtype=torch.int64)), "x dtype"),
    ])
    def test_bad_inputs(self, bad, match):
        x, w1, b1, w2, b2, z, m = [t.detach() for t in make((3,), 6, 5)]
        args = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, int_z=z, mlp_z=m)
        bad(args)
        with pytest.raises((ValueError, TypeError), match=match):
            ops.masked_ffn(**args)


class TestMaskedFfnRouting:
    def test_forced_backends_recorded(self):
        x, w1, b1, w2, b2, z, m = [t.detach() for t in make((3,), 6, 5)]
        for backend in available():
            ops.masked_ffn(x, w1, b1, w2, b2, z, m, backend=backend)
            assert ops.last_backend(OP) == backend
            with ops.use_backend(backend):
                ops.masked_ffn(x, w1, b1, w2, b2, z, m)
            assert ops.last_backend(OP) == backend

    def test_auto_prefers_native_on_cpu(self):
        x, w1, b1, w2, b2, z, m = [t.detach() for t in make((3,), 6, 5)]
        ops.masked_ffn(x, w1, b1, w2, b2, z, m)
        assert ops.last_backend(OP) == ("native" if "native" in available() else "reference")

    def test_unavailable_explicit_backend_raises(self):
        x = torch.zeros(2, 6, device="meta")  # CPU native takes every float dtype (halves: fp32 epilogue)
        with pytest.raises(ops.BackendError, match="no native kernels for device 'meta'"):
            B.resolve("masked_ffn", "native", x)


@pytest.mark.parametrize("rows", [128, 600])  # column-split GEMMs (<= 256 rows) and BLAS's own split
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_cpu_gemm_split(rows, threads, monkeypatch):
    """csrc/cpu_linear.h: with few rows and >= 64 output columns per thread, each thread computes its
    own block of output columns (widths 300 and 160: one and two blocks per thread, a ragged last
    block). Forward and gradients match the float64 reference whatever the thread count, and the
    forward matches the unsplit GEMMs (COFI_GEMM_SPLIT=0)."""
    if "native" not in available():
        pytest.skip("native not built")
    ins = make((rows,), 160, 300, torch.float64, "mixed", 0.7, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.masked_ffn(*ins, backend="native")
        g = torch.randn_like(y)
        got = grads(y, ins, g)
        monkeypatch.setenv("COFI_GEMM_SPLIT", "0")
        with torch.no_grad():
            unsplit = ops.masked_ffn(*ins, backend="native")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(y, unsplit, atol=1e-12, rtol=1e-12)
    ref_ins = [t.detach().requires_grad_() if t is not None else None for t in ins]
    yr = masked_ffn_ref(*ref_ins)
    torch.testing.assert_close(y, yr, **tol(OP, "fwd", torch.float64))
    for a, b in zip(got, grads(yr, ref_ins, g)):
        torch.testing.assert_close(a, b, **tol(OP, "bwd", torch.float64))


@pytest.mark.cuda
class TestMaskedFfnGpu:
    @pytest.mark.parametrize("backend", ["native", "triton"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_vs_fp32_reference(self, backend, dtype):
        ins = make((64,), 96, 200, torch.float32)
        ins = [t.detach().cuda() if t is not None else None for t in ins]
        y = ops.masked_ffn(*[t.to(dtype) for t in ins], backend=backend)
        yr = masked_ffn_ref(*[t.double() for t in ins]).float()
        ylow = masked_ffn_ref(*[t.to(dtype) for t in ins]).float()
        err, ref_err = (y.float() - yr).abs().max(), (ylow - yr).abs().max()
        assert err <= 2 * ref_err + 1e-5
        assert cofi.ops.last_backend(OP) == backend
