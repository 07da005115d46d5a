"""masked_attention: every backend vs the reference, gradients, registration, routing, hygiene."""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops import _backends as B
from cofi.ops.masked_attention import masked_attention, masked_attention_packed
from cofi.ops.reference.masked_attention import (
    dropout_keep,
    dropout_seed,
    masked_attention_core_ref,
    masked_attention_ref,
)

OP = "masked_attention"


def available() -> list[str]:
    q = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY[OP].impls.items() if not impl.reasons(q)]


KERNELS = [b for b in available() if b != "reference"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def masked_attention_samples(dtype=torch.float64, requires_grad=False):
    """(name, q, k, v, head_z, mask) covering H=0/1, S=1, odd S/D, padding, all-masked rows, gates 0/1."""
    g = gen(0)
    cases = [
        ("basic", 2, 3, 9, 8, "rand", None),
        ("H0", 2, 0, 5, 4, "none", None),
        ("H1", 1, 1, 6, 5, "one", None),
        ("S1", 3, 2, 1, 3, "rand", None),
        ("odd", 2, 3, 13, 7, "zero_one", "pad"),
        ("all_masked_row", 3, 2, 7, 6, "rand", "one_empty"),
        ("no_gate_pad", 2, 2, 17, 16, "none", "pad"),
        ("all_dead", 2, 3, 5, 4, "all_zero", None),
    ]
    out = []
    for name, Bsz, H, S, D, gate, pad in cases:
        q, k, v = (torch.randn(Bsz, H, S, D, generator=g, dtype=dtype) for _ in range(3))
        z = None
        if gate == "rand":
            z = torch.rand(H, generator=g, dtype=dtype) + 0.1
        elif gate == "one":
            z = torch.ones(H, dtype=dtype)
        elif gate == "zero_one":
            z = torch.rand(H, generator=g, dtype=dtype)
            z[0], z[-1] = 0.0, 1.0
        elif gate == "all_zero":
            z = torch.zeros(H, dtype=dtype)
        mask = None
        if pad is not None:
            mask = torch.rand(Bsz, S, generator=g) > 0.3
            mask[:, 0] = True
            if pad == "one_empty":
                mask[1] = False
        if requires_grad:
            for t in (q, k, v) + ((z,) if z is not None else ()):
                t.requires_grad_(True)
        out.append((name, q, k, v, z, mask))
    return out


SAMPLES = masked_attention_samples()
IDS = [s[0] for s in SAMPLES]


def run(backend, q, k, v, z, mask, dropout_p=0.0, seed=7):
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    zz = z.detach().clone().requires_grad_(True) if z is not None else None
    out = masked_attention(*ins, zz, mask, dropout_p=dropout_p, generator=gen(seed), backend=backend)
    assert ops.last_backend(OP) == backend
    go = torch.randn(out.shape, generator=gen(123), dtype=out.dtype)
    wrt = ins + ([zz] if zz is not None else [])
    grads = torch.autograd.grad(out, wrt, go) if out.numel() else [torch.zeros_like(t) for t in wrt]
    return out, list(grads)


def assert_all_close(got, want, dtype, what):
    (o1, g1), (o2, g2) = got, want
    torch.testing.assert_close(o1, o2, **tol(OP, "fwd", dtype), msg=lambda m: f"{what} out: {m}")
    for i, (a, b) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(a, b, **tol(OP, "bwd", dtype), msg=lambda m, i=i: f"{what} grad[{i}]: {m}")


class TestMaskedAttentionReference:
    def test_matches_naive_formula(self):
        _, q, k, v, z, mask = SAMPLES[0]
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        want = torch.softmax(s, -1) @ v * z[None, :, None, None]
        torch.testing.assert_close(masked_attention_ref(q, k, v, z), want)

    def test_all_masked_row_is_zero_not_nan(self):
        _, q, k, v, z, mask = SAMPLES[5]
        out, lse = masked_attention_core_ref(q, k, v, z, mask, 0.5, 0.0, None)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and torch.isinf(lse[1]).all()

    def test_dead_head_zero_output_and_grads(self):
        _, q, k, v, z, mask = SAMPLES[4]
        out, grads = run("reference", q, k, v, z, mask)
        assert (out[:, 0] == 0).all()
        assert all((g[:, 0] == 0).all() for g in grads[:3]) and grads[3][0] == 0

    def test_dropout_rate_and_reproducible(self):
        seed = dropout_seed(gen(3), torch.device("cpu"))
        keep = dropout_keep(seed, 4, 3, 64, 0.1)
        rate = 1 - keep.double().mean().item()
        n = keep.numel()
        assert abs(rate - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)  # 5 sigma
        assert torch.equal(keep, dropout_keep(seed, 4, 3, 64, 0.1))
        assert not torch.equal(keep, dropout_keep(dropout_seed(gen(4), torch.device("cpu")), 4, 3, 64, 0.1))
        # same generator state -> same result through the public reference
        _, q, k, v, z, _ = SAMPLES[0]
        a = masked_attention_ref(q, k, v, z, dropout_p=0.3, generator=gen(1))
        b = masked_attention_ref(q, k, v, z, dropout_p=0.3, generator=gen(1))
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class TestMaskedAttentionBackends:
    @pytest.mark.parametrize("backend", KERNELS)
    @pytest.mark.parametrize("sample", SAMPLES, ids=IDS)
    def test_float64_vs_reference(self, backend, sample):
        name, q, k, v, z, mask = sample
        assert_all_close(run(backend, q, k, v, z, mask), run("reference", q, k, v, z, mask), torch.float64,
                         f"{backend}/{name}")

    @pytest.mark.parametrize("backend", KERNELS)
    @pytest.mark.parametrize("idx", [0, 4, 5])
    def test_dropout_matches_reference(self, backend, idx):
        name, q, k, v, z, mask = SAMPLES[idx]
        assert_all_close(run(backend, q, k, v, z, mask, dropout_p=0.25), run("reference", q, k, v, z, mask, 0.25),
                         torch.float64, f"{backend}/{name}/dropout")

    @pytest.mark.parametrize("backend", KERNELS)
    def test_float32(self, backend):
        _, q, k, v, z, mask = SAMPLES[4]
        q, k, v, z = (t.float() for t in (q, k, v, z))
        assert_all_close(run(backend, q, k, v, z, mask), run("reference", q, k, v, z, mask), torch.float32, backend)

    def test_native_long_sequence_two_key_blocks(self):
        if "native" not in KERNELS:
            pytest.skip("native not built")
        g = gen(5)
        q, k, v = (torch.randn(1, 2, 600, 8, generator=g, dtype=torch.float64) for _ in range(3))
        mask = torch.rand(1, 600, generator=g) > 0.2
        z = torch.tensor([0.5, 1.0], dtype=torch.float64)
        assert_all_close(run("native", q, k, v, z, mask, 0.1), run("reference", q, k, v, z, mask, 0.1),
                         torch.float64, "native/S600")

    def test_native_query_block_tasks(self):
        """Few (batch, head) pairs: the forward runs each query block as its own task (S = 150: two
        full blocks and a ragged one), with padding, a fully masked batch row and dropout."""
        if "native" not in KERNELS:
            pytest.skip("native not built")
        g = gen(7)
        q, k, v = (torch.randn(2, 2, 150, 8, generator=g, dtype=torch.float64) for _ in range(3))
        mask = torch.rand(2, 150, generator=g) > 0.3
        mask[1] = False
        z = torch.tensor([0.7, 1.0], dtype=torch.float64)
        before = torch.get_num_threads()
        torch.set_num_threads(2)  # split when batch x live heads < 4 x threads
        try:
            for p in (0.0, 0.2):
                assert_all_close(run("native", q, k, v, z, mask, p), run("reference", q, k, v, z, mask, p),
                                 torch.float64, f"native/S150/p{p}")
        finally:
            torch.set_num_threads(before)

    @pytest.mark.parametrize("backend", ["reference"] + KERNELS)
    def test_packed_qkv_views_no_copy(self, backend):
        g = gen(6)
        qkv = torch.randn(2, 7, 3, 3, 8, generator=g, dtype=torch.float64)
        z = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
        want = masked_attention_ref(*(qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3)), z)
        torch.testing.assert_close(masked_attention_packed(qkv, z, backend=backend), want)

    @pytest.mark.parametrize("backend", KERNELS)
    def test_nan_in_padding_does_not_leak(self, backend):
        _, q, k, v, z, mask = SAMPLES[4]
        clean = masked_attention(q, k, v, z, mask, backend=backend)
        kp, vp = k.clone(), v.clone()
        pad = ~mask[:, None, :, None].expand_as(kp)
        kp[pad] = float("nan")
        vp[pad] = float("nan")
        qp = q.clone()
        qp[:, 0] = float("nan")  # head 0 is dead (gate exactly 0): never read
        poisoned = masked_attention(qp, kp, vp, z, mask, backend=backend)
        torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)
        ins = [t.clone().requires_grad_(True) for t in (qp, kp, vp)]
        grads = torch.autograd.grad(masked_attention(*ins, z, mask, backend=backend).sum(), ins)
        assert all(torch.isfinite(gr).all() for gr in grads)

    @pytest.mark.parametrize("backend", KERNELS)
    def test_deterministic(self, backend):
        _, q, k, v, z, mask = SAMPLES[0]
        a = run(backend, q, k, v, z, mask, 0.2)
        b = run(backend, q, k, v, z, mask, 0.2)
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))

    @pytest.mark.parametrize("backend", ["reference"] + KERNELS)
    def test_gradcheck(self, backend):
        g = gen(8)
        q, k, v = (torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        z = torch.tensor([0.7, 1.0], dtype=torch.float64, requires_grad=True)
        mask = torch.tensor([[True, True, False, True, True], [False] * 5])
        fn = lambda q, k, v, z: masked_attention(q, k, v, z, mask, backend=backend)  # noqa: E731
        # fast_mode: a few random directional derivatives instead of one per input element
        assert torch.autograd.gradcheck(fn, (q, k, v, z), eps=1e-6, atol=1e-6, fast_mode=True)
        fnd = lambda q, k, v: masked_attention(q, k, v, None, None, dropout_p=0.3, generator=gen(2),  # noqa: E731
                                               backend=backend)
        assert torch.autograd.gradcheck(fnd, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


class TestMaskedAttentionRegistration:
    def _op_samples(self):
        g = gen(9)
        q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
        z = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
        mask = torch.tensor([[True, True, False, True, True], [False] * 5])
        seed = torch.tensor([11, 22])
        qkv = torch.randn(2, 5, 3, 3, 4, generator=g, dtype=torch.float64)
        packed = tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
        return [(q, k, v, z, mask, 0.5, 0.0, None), (q, k, v, None, None, 0.5, 0.2, seed),
                (*packed, z, mask, 0.5, 0.0, None)]

    @pytest.mark.parametrize("backend", ["reference"] + KERNELS)
    def test_opcheck_public(self, backend):
        samples = self._op_samples()
        # native runs every sample with and without grad; the slow ones (interpreted Triton, eager
        # reference) one sample with grad and one without, to stay inside the file's time budget
        plan = [(a, rg) for a in samples for rg in (False, True)] if backend == "native" else \
            [(samples[0], True), (samples[1], False)]
        for args, rg in plan:
            a = [t.clone().requires_grad_(rg) if (i < 4 and t is not None) else t for i, t in enumerate(args)]
            torch.library.opcheck(torch.ops.cofi.masked_attention.default, (*a, backend))

    def test_opcheck_native(self):
        if "native" not in KERNELS:
            pytest.skip("native not built")
        for args in self._op_samples():
            out, lse = torch.ops.cofi.masked_attention_fwd_native(*[t.contiguous() if isinstance(t, torch.Tensor)
                                                                    else t for t in args])
            torch.library.opcheck(torch.ops.cofi.masked_attention_fwd_native.default,
                                  tuple(t.contiguous() if isinstance(t, torch.Tensor) and i < 3 else t
                                        for i, t in enumerate(args)))
            q, k, v, z, mask, scale, p, seed = args
            grad = torch.randn_like(out)
            torch.library.opcheck(torch.ops.cofi.masked_attention_bwd_native.default,
                                  (grad, q.contiguous(), k.contiguous(), v.contiguous(), z, mask, out, lse, scale, p,
                                   seed))

    def test_compile_fullgraph(self):
        _, q, k, v, z, mask = SAMPLES[4]
        q, k, v, z = (t.clone().requires_grad_(True) for t in (q, k, v, z))

        def f(q, k, v, z, mask):
            return masked_attention(q, k, v, z, mask).sum()

        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(cf(q, k, v, z, mask), (q, k, v, z))
        want = torch.autograd.grad(f(q, k, v, z, mask), (q, k, v, z))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("bad,match", [
        (dict(k=torch.zeros(2, 3, 4, 5, dtype=torch.float64)), "k must have"),
        (dict(v=torch.zeros(2, 3, 5, 5, dtype=torch.float64)), "v must have"),
        (dict(q=torch.zeros(2, 3, 5, dtype=torch.float64)), "q must have 4 dims"),
        (dict(k=torch.zeros(2, 3, 5, 4, dtype=torch.float32)), "k dtype"),
        (dict(q=torch.zeros(2, 3, 5, 4, dtype=torch.int64)), "q dtype"),
        (dict(head_z=torch.ones(4, dtype=torch.float64)), "head_z must have shape"),
        (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "key_padding_mask must have shape"),
        (dict(key_padding_mask=torch.ones(2, 5)), "key_padding_mask dtype"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(dropout_p=-0.1), "dropout_p"),
        (dict(scale=float("nan")), "scale"),
        (dict(backend="cuda"), "backend"),
    ])
    def test_bad_inputs(self, bad, match):
        args = dict(q=torch.zeros(2, 3, 5, 4, dtype=torch.float64), k=torch.zeros(2, 3, 5, 4, dtype=torch.float64),
                    v=torch.zeros(2, 3, 5, 4, dtype=torch.float64), head_z=None, key_padding_mask=None)
        args.update(bad)
        with pytest.raises((ValueError, TypeError), match=match):
            masked_attention(**args)

    def test_native_rejects_bad_shapes(self):
        if "native" not in KERNELS:
            pytest.skip("native not built")
        q = torch.zeros(2, 3, 5, 4)
        with pytest.raises(RuntimeError, match="head_z"):
            torch.ops.cofi.masked_attention_fwd_native(q, q, q, torch.ones(2), None, 1.0, 0.0, None)
        with pytest.raises(RuntimeError, match="key_padding_mask"):
            torch.ops.cofi.masked_attention_fwd_native(q, q, q, None, torch.ones(2, 4, dtype=torch.bool), 1.0, 0.0, None)


class TestMaskedAttentionRouting:
    @pytest.mark.parametrize("backend", ["reference"] + KERNELS)
    def test_forced_backend_runs(self, backend):
        _, q, k, v, z, mask = SAMPLES[0]
        masked_attention(q, k, v, z, backend=backend)
        assert ops.last_backend(OP) == backend
        with ops.use_backend(backend):
            masked_attention(q, k, v, z)
        assert ops.last_backend(OP) == backend

    def test_auto_picks_native_on_cpu(self):
        _, q, k, v, z, mask = SAMPLES[0]
        masked_attention(q, k, v, z)
        assert ops.last_backend(OP) == ("native" if "native" in KERNELS else "reference")

    def test_unavailable_backend_raises_with_reasons(self):
        q = torch.zeros(1, 1, 2, 4, device="meta")  # CPU native takes every float dtype (halves computed in fp32)
        with pytest.raises(B.BackendError, match="no native kernels for device 'meta'"):
            B.resolve(OP, "native", q, q, q)


@pytest.mark.cuda
class TestMaskedAttentionGpu:
    @pytest.mark.parametrize("backend", ["native", "triton"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_vs_fp32_reference(self, backend, dtype):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 4, 200, 64, device="cuda", generator=g) for _ in range(3))
        z = torch.tensor([1.0, 0.0, 0.3, 0.8], device="cuda")
        mask = torch.rand(2, 200, device="cuda", generator=g) > 0.2
        ref = masked_attention(q, k, v, z, mask, backend="reference")
        ref_lp = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), z, mask, backend="reference").float()
        got = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), z, mask, backend=backend).float()
        assert (got - ref).abs().max() <= 2 * (ref_lp - ref).abs().max() + 1e-5
