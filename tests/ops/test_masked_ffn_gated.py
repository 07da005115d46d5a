"""masked_ffn with gated activations (SwiGLU, GeGLU, ReGLU): every backend vs the reference in
float64, dead units, gradients, registration, transformers' LlamaMLP, bad inputs."""
from __future__ import annotations

import types

import pytest
import torch
from _tolerances import tol
from cofi import ops
from cofi.errors import UserError
from cofi.ops import _backends as B
from cofi.ops import masked_ffn_gated as G
from cofi.ops.reference import masked_ffn_gated_ref
from cofi.vocab import GATE_FUNCTIONS, GATED_ACTIVATIONS

OP = G.OP
ACTS = tuple(GATED_ACTIVATIONS)  # swiglu, geglu, geglu_tanh, reglu


def available() -> list[str]:
    x = torch.zeros(2, 3, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY[OP].impls.items() if not impl.reasons(x)]


def make(lead=(5,), d=7, F=6, dtype=torch.float64, z="mixed", m=0.7, bias=True, seed=0, requires_grad=True):
    """(x, w1, b1, w2, b2, int_z, mlp_z, wg, bg) in the public argument order; z: 'mixed' (some exact
    zeros), 'dead', 'live' or None; bias=False gives None biases (Llama)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w1, b1, w2, b2, wg, bg = r(*lead, d), r(F, d) * 0.5, r(F), r(d, F) * 0.5, r(d), r(F, d) * 0.5, r(F)
    if not bias:
        b1 = b2 = bg = None
    int_z = None if z is None else torch.rand(F, generator=g, dtype=torch.float64) + 0.1
    if z == "mixed":
        int_z[::3] = 0
    elif z == "dead":
        int_z.zero_()
    mlp_z = None if m is None else torch.tensor(m, dtype=torch.float64)
    out = [t.to(dtype) if t is not None else None for t in (x, w1, b1, w2, b2, int_z, mlp_z, wg, bg)]
    return [t.requires_grad_(requires_grad) if t is not None else None for t in out]


def call(ins, activation="swiglu", **kw):
    x, w1, b1, w2, b2, z, m, wg, bg = ins
    return ops.masked_ffn(x, w1, b1, w2, b2, z, m, activation=activation, gate_weight=wg, gate_bias=bg, **kw)


def ref(ins, activation="swiglu"):
    x, w1, b1, w2, b2, z, m, wg, bg = ins
    return masked_ffn_gated_ref(x, wg, bg, w1, b1, w2, b2, z, m, activation)


def check_vs_reference(ins, backend, activation="swiglu", dtype=torch.float64, seed=1):
    y = call(ins, activation, backend=backend)
    assert ops.last_backend(OP) == backend
    ref_ins = [t.detach().double().requires_grad_() if t is not None else None for t in ins]
    y_ref = ref(ref_ins, activation)
    torch.testing.assert_close(y.double(), y_ref, **tol("masked_ffn", "fwd", dtype))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    live = [i for i, t in enumerate(ins) if t is not None and t.requires_grad]
    if not live:
        return
    got = torch.autograd.grad(y, [ins[i] for i in live], g.to(y.dtype), allow_unused=True)
    want = torch.autograd.grad(y_ref, [ref_ins[i] for i in live], g, allow_unused=True)
    for i, a, b in zip(live, got, want):
        b = torch.zeros_like(ref_ins[i]) if b is None else b
        torch.testing.assert_close(a.double(), b, **tol("masked_ffn", "bwd", dtype), msg=lambda s, i=i: f"arg {i}: {s}")


SHAPES = [  # (lead, d, F, z, m, bias)
    ((5,), 7, 6, "mixed", 0.7, True),
    ((2, 3), 9, 13, "mixed", None, False),  # 3-D input, no biases (Llama)
    ((4,), 8, 0, None, 0.5, True),           # F = 0
    ((3,), 5, 6, "dead", 1.3, False),        # every unit dead
    ((1,), 16, 10, "live", None, True),      # batch 1, every unit live
    ((6,), 3, 4, None, None, False),         # no masks at all
    ((4,), 6, 5, "mixed", 0.0, True),        # mlp_z == 0: skipped, exact d mlp_z
    ((0,), 6, 5, "mixed", 0.7, True),        # no tokens
]


class TestReference:
    def test_matches_formula(self):
        x, w1, b1, w2, b2, z, m, wg, bg = make(requires_grad=False)
        want = m * ((torch.nn.functional.silu(x @ wg.T + bg) * (x @ w1.T + b1) * z) @ w2.T + b2)
        torch.testing.assert_close(ref((x, w1, b1, w2, b2, z, m, wg, bg)), want)

    def test_vocab_codes(self):
        assert GATE_FUNCTIONS[:3] == ops.masked_ffn.__globals__["ACTIVATIONS"]
        assert GATE_FUNCTIONS.index(GATED_ACTIVATIONS["swiglu"]) == 3


@pytest.mark.parametrize("backend", available())
class TestBackends:
    @pytest.mark.parametrize("shape", SHAPES, ids=[f"s{i}" for i in range(len(SHAPES))])
    def test_vs_reference_float64(self, backend, shape):
        lead, d, F, z, m, bias = shape
        acts = ACTS if backend != "triton" else ("swiglu", "geglu_tanh")  # interpreted Triton is slow
        for i, act in enumerate(acts):
            check_vs_reference(make(lead, d, F, torch.float64, z, m, bias, seed=i), backend, act)

    def test_float32(self, backend):
        check_vs_reference(make((6,), 12, 10, torch.float32), backend, "swiglu", torch.float32)

    def test_live_idx(self, backend):
        ins = make((4,), 6, 8, z="live", m=0.9)
        live = torch.tensor([6, 1, 3], dtype=torch.int64)
        y = call(ins, backend=backend, live_idx=live)
        z = torch.zeros(8, dtype=torch.float64)
        z[live] = ins[5].detach()[live]
        ref_ins = [t.detach() if t is not None else None for t in ins]
        ref_ins[5] = z
        torch.testing.assert_close(y, ref(ref_ins), **tol("masked_ffn", "fwd", torch.float64))
        gw = torch.autograd.grad(y.sum(), ins[7])[0]
        assert torch.all(gw[[0, 2, 4, 5, 7]] == 0) and torch.all(gw[live].abs().sum(1) > 0)

    def test_noncontiguous_inputs(self, backend):
        _, w1, b1, w2, b2, z, m, wg, bg = make((6,), 8, 5, requires_grad=False)
        xt = torch.randn(8, 6, dtype=torch.float64).t()
        wgt = wg.t().contiguous().t()
        got = call((xt, w1, b1, w2, b2, z, m, wgt, bg), backend=backend)
        torch.testing.assert_close(got, ref((xt, w1, b1, w2, b2, z, m, wg, bg)))

    def test_gradcheck(self, backend):
        ins = make((3,), 4, 5, z="live", m=0.8)  # d int_z at exact zeros is 0 by convention
        if backend == "triton":
            ins = [t.detach() if t is not None else None for t in ins]
            ins[0].requires_grad_()

        def f(x, w1, b1, w2, b2, z, m, wg, bg):
            return call((x, w1, b1, w2, b2, z, m, wg, bg), backend=backend)

        assert torch.autograd.gradcheck(f, tuple(ins))


@pytest.mark.skipif("triton" not in available(), reason="Triton not runnable here")
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (GPU runs use these configs anyway)")
def test_triton_gpu_tiles_vs_reference():
    """The Triton kernels with the GPU launch configuration (as COFI_TRITON_GPU_CONFIGS=1), on sizes
    where every GEMM dim spans two tiles (float64; float32 runs the same code in test_float32)."""
    from cofi_kernels import configs

    c = configs.FFN_GEMM
    N, d, F = c.block_m + 7, c.block_k + 9, 2 * c.block_n + 5
    with configs.gpu_configs_forced():
        check_vs_reference(make((N,), d, F, bias=False), "triton", "swiglu")


class TestLlamaMLP:
    @pytest.fixture(scope="class")
    @classmethod
    def mlp(cls):
        transformers = pytest.importorskip("transformers")
        from transformers.models.llama.modeling_llama import LlamaMLP

        cfg = transformers.LlamaConfig(hidden_size=12, intermediate_size=20, num_attention_heads=2, num_key_value_heads=1,
                                       hidden_act="silu", mlp_bias=False)
        torch.manual_seed(0)
        return LlamaMLP(cfg).double()

    @pytest.mark.parametrize("backend", available())
    def test_all_live_equals_llama_mlp(self, mlp, backend):
        x = torch.randn(2, 5, 12, dtype=torch.float64)
        y = ops.masked_ffn(x, mlp.up_proj.weight, None, mlp.down_proj.weight, None, activation="swiglu",
                           gate_weight=mlp.gate_proj.weight, backend=backend)
        torch.testing.assert_close(y, mlp(x), atol=1e-12, rtol=1e-12)

    @pytest.mark.parametrize("backend", available())
    def test_kept_units_equal_pruned_llama_mlp(self, mlp, backend):
        from transformers.models.llama.modeling_llama import LlamaMLP

        keep = torch.tensor([0, 3, 4, 9, 10, 17])
        z = torch.zeros(20, dtype=torch.float64)
        z[keep] = 1.0
        cfg = mlp.config.__class__(**{**mlp.config.to_dict(), "intermediate_size": len(keep)})
        small = LlamaMLP(cfg).double()
        with torch.no_grad():
            small.gate_proj.weight.copy_(mlp.gate_proj.weight[keep])
            small.up_proj.weight.copy_(mlp.up_proj.weight[keep])
            small.down_proj.weight.copy_(mlp.down_proj.weight[:, keep])
        x = torch.randn(7, 12, dtype=torch.float64)
        y = ops.masked_ffn(x, mlp.up_proj.weight, None, mlp.down_proj.weight, None, z, activation="swiglu",
                           gate_weight=mlp.gate_proj.weight, backend=backend)
        torch.testing.assert_close(y, small(x), atol=1e-12, rtol=1e-12)


class TestRegistration:
    def _raw(self):
        x, w1, b1, w2, b2, z, m, wg, bg = [t.detach() if t is not None else None for t in make((4,), 6, 5)]
        return x, wg, bg, w1, b1, w2, b2, z, m

    def test_opcheck_public(self):
        x, w1, b1, w2, b2, z, m, wg, bg = make((4,), 6, 5)
        live = torch.nonzero(z.detach()).squeeze(1)
        for backend in available():
            cases = [(x, wg, bg, w1, b1, w2, b2, z, m, None, 3, backend),
                     (x, wg, bg, w1, b1, w2, b2, None, None, None, 0, backend),
                     (x, wg, bg, w1, b1, w2, b2, z, m, live, 1, backend)]
            for args in (cases if backend == "native" else cases[:1]):  # the op's registration, once in full
                torch.library.opcheck(torch.ops.cofi.masked_ffn_gated.default, args)

    def test_opcheck_backward_op(self):
        x, wg, bg, w1, b1, w2, b2, z, m = self._raw()
        _, h = torch.ops.cofi.masked_ffn_gated(x, wg, bg, w1, b1, w2, b2, z, m, None, 3, "reference")
        assert h.shape == (4, 2 * int((z != 0).sum()))
        g = torch.randn(4, 6, dtype=torch.float64)
        torch.library.opcheck(torch.ops.cofi.masked_ffn_gated_backward.default,
                              (g, x, wg, bg, w1, b1, w2, b2, z, m, None, h, 3, [True] * 9, "reference"))

    @pytest.mark.skipif("native" not in available(), reason="extension not built")
    def test_opcheck_native(self):
        x, wg, bg, w1, b1, w2, b2, z, m = self._raw()
        live = torch.nonzero(z).squeeze(1)
        args = (x, wg, bg, w1, b1, w2, b2, z, m, live, 3)
        torch.library.opcheck(torch.ops.cofi.masked_ffn_gated_fwd_native.default, args)
        y, h = torch.ops.cofi.masked_ffn_gated_fwd_native(*args)
        torch.library.opcheck(torch.ops.cofi.masked_ffn_gated_bwd_native.default,
                              (torch.randn_like(y), *args[:10], h, 3, [True] * 9))

    @pytest.mark.skipif("native" not in available(), reason="extension not built")
    def test_native_half_inputs(self):
        ins = make((8,), 16, 12, dtype=torch.bfloat16, requires_grad=False)
        y = call(ins, backend="native")
        want = ref([t.double() if t is not None else None for t in ins])
        torch.testing.assert_close(y.double(), want, atol=0.1, rtol=0.05)

    def test_compile_fullgraph(self):
        ins = make((2, 3), 6, 5)
        f = torch.compile(lambda *t: call(t), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(f(*ins), ref(ins))

    def test_autocast_policy_lowers(self):
        assert ops._autocast.POLICIES["masked_ffn_gated"] == "lower"
        ins = [t.float() if t is not None else None for t in make((4,), 6, 5, requires_grad=False)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(ins, backend="reference")
        assert y.dtype == torch.bfloat16

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's refusal")
    def test_native_on_cuda_refused_without_cuda_kernels(self):
        from cofi import _ext

        fake = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
        why = G._native_reasons(fake)
        if _ext.native_loaded() and _ext.build_info().get("cuda_compiled"):
            assert why == []  # a CUDA build has the gated kernels
        else:
            assert why and ("CUDA" in why[0] or "extension" in why[0])

    def test_default_activation_unchanged(self):
        x, w1, b1, w2, b2, z, m, _, _ = make(requires_grad=False)
        ops.masked_ffn(x, w1, b1, w2, b2, z, m)
        assert ops.last_backend("masked_ffn") in ("native", "reference")


class TestBadInputs:
    def _ins(self):
        return make(requires_grad=False)

    def test_swiglu_needs_gate_weight(self):
        x, w1, b1, w2, b2, z, m, _, _ = self._ins()
        with pytest.raises(UserError, match="activation='swiglu' needs gate_weight"):
            ops.masked_ffn(x, w1, b1, w2, b2, z, m, activation="swiglu")

    def test_gate_weight_needs_gated_activation(self):
        x, w1, b1, w2, b2, z, m, wg, _ = self._ins()
        with pytest.raises(UserError, match="gate_weight / gate_bias need a gated activation"):
            ops.masked_ffn(x, w1, b1, w2, b2, z, m, activation="gelu", gate_weight=wg)

    @pytest.mark.parametrize("arg,bad,msg", [
        ("gate_weight", torch.zeros(5, 7, dtype=torch.float64), "gate_weight must have shape"),
        ("gate_weight", torch.zeros(6, 7, dtype=torch.float32), "gate_weight dtype"),
        ("gate_bias", torch.zeros(7, dtype=torch.float64), "gate_bias must have shape"),
    ])
    def test_bad_gate_tensors(self, arg, bad, msg):
        x, w1, b1, w2, b2, z, m, wg, bg = self._ins()
        kw = {"gate_weight": wg, "gate_bias": bg, arg: bad}
        with pytest.raises((ValueError, TypeError), match=msg) as e:
            ops.masked_ffn(x, w1, b1, w2, b2, z, m, activation="swiglu", **kw)
        assert "\n" not in str(e.value)

    def test_unknown_activation_lists_gated(self):
        x, w1, b1, w2, b2, z, m, _, _ = self._ins()
        with pytest.raises(ValueError, match="swiglu"):
            ops.masked_ffn(x, w1, b1, w2, b2, z, m, activation="swish", gate_weight=None)
