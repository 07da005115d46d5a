"""Autocast policies of the cofi ops (python/cofi/ops/_autocast.py, docs/ops-inputs.md "Autocast").

Under ``torch.autocast("cpu", dtype)`` every op and backend gives the policy's output dtype, values
within low-precision tolerance of the float64 truth (the FlashAttention rule: at most 2x the error of
the eager reference computed in that dtype, plus a small floor), and gradients in each input's own
dtype, equally close. Triton runs under the interpreter (TRITON_INTERPRET=1, tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
from torch._library.custom_ops import OPDEFS

import cofi.ops as O
from cofi.ops import _autocast
from cofi.ops import _backends as B

LOW = [torch.bfloat16, torch.float16]
BACKENDS = ["reference", "native", "triton"]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_low_close(got: torch.Tensor, truth: torch.Tensor, ref_low: torch.Tensor, what: str) -> None:
    """got vs the float64 truth: at most 2x the low-precision reference's own error, plus a floor of
    2^-8 of the truth's scale (one bf16 ulp at that scale, for results where the reference is exact)."""
    scale = max(truth.abs().max().item(), 1.0) if truth.numel() else 1.0
    bound = 2.0 * _max_err(ref_low, truth) + scale * 2.0 ** -8
    err = _max_err(got, truth)
    assert err <= bound, f"{what}: max error {err:.3g} vs the float64 truth exceeds {bound:.3g}"


def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _run(fn, inputs: list[torch.Tensor], dtype: torch.dtype | None, backend: str, seed: int = 7):
    """Output and input gradients of fn(*inputs, backend) (sum of out * fixed weights), under
    torch.autocast("cpu", dtype) when dtype is given; backward outside the autocast block as usual."""
    xs = _leaves(*inputs)
    if dtype is None:
        out = fn(*xs, backend=backend)
    else:
        with torch.autocast("cpu", dtype):
            out = fn(*xs, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * w).sum().backward()
    return out, [x.grad for x in xs]


# ---------------------------------------------------------------------------------------- op cases

def _attention_case():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 16, generator=g) for _ in range(3))
    z = torch.tensor([0.7, 0.0, 1.0])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False

    def fn(q, k, v, z, backend):
        return O.masked_attention(q, k, v, head_z=z, key_padding_mask=mask, backend=backend)

    return fn, [q, k, v, z]


def _ffn_case():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=g)
    w1, b1 = torch.randn(32, 16, generator=g) / 4, torch.randn(32, generator=g) / 4
    w2, b2 = torch.randn(16, 32, generator=g) / 6, torch.randn(16, generator=g) / 4
    int_z = torch.rand(32, generator=g)
    int_z[::5] = 0
    mlp_z = torch.tensor([0.8])

    def fn(x, w1, b1, w2, b2, int_z, mlp_z, backend):
        return O.masked_ffn(x, w1, b1, w2, b2, int_z, mlp_z, backend=backend)

    return fn, [x, w1, b1, w2, b2, int_z, mlp_z]


def _layer_norm_case():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(6, 24, generator=g), torch.randn(6, 24, generator=g)
    w, b = 1 + torch.randn(24, generator=g) / 4, torch.randn(24, generator=g) / 4
    hz = torch.rand(24, generator=g)
    hz[::4] = 0

    def fn(x, r, w, b, hz, backend):
        return O.masked_layer_norm(x, r, w, b, hz, backend=backend)

    return fn, [x, r, w, b, hz]


CASES = {"masked_attention": _attention_case, "masked_ffn": _ffn_case, "masked_layer_norm": _layer_norm_case}


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(CASES))
def test_op_under_autocast(op, backend, dtype):
    fn, inputs = CASES[op]()
    truth, truth_grads = _run(fn, [t.double() for t in inputs], None, "reference")
    policy = _autocast.POLICIES[op]
    low = dtype if policy == _autocast.LOWER else torch.float32
    ref_low, ref_low_grads = _run(fn, [t.to(low) for t in inputs], None, "reference")
    B.reset_stats()
    out, grads = _run(fn, inputs, dtype, backend)
    assert B.last_backend(op) == backend
    assert out.dtype == low, f"{op} under {dtype} autocast: output {out.dtype}, policy says {low}"
    _assert_low_close(out, truth, ref_low, f"{op}/{backend} output")
    for i, (g, tg, rg, x) in enumerate(zip(grads, truth_grads, ref_low_grads, inputs)):
        assert g is not None and g.dtype == x.dtype, f"{op}/{backend} grad {i}: {None if g is None else g.dtype}"
        _assert_low_close(g, tg, rg, f"{op}/{backend} grad {i}")


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_layer_norm_mixed_inputs_fp32_output(backend):
    """The encoder's case: x from a bf16 linear, residual and parameters fp32 -> fp32 output, and
    each gradient in its input's dtype."""
    fn, (x, r, w, b, hz) = _layer_norm_case()
    xs = _leaves(x.bfloat16(), r, w, b, hz)
    with torch.autocast("cpu", torch.bfloat16):
        y = fn(*xs, backend=backend)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert [t.grad.dtype for t in xs] == [torch.bfloat16] + [torch.float32] * 4
    ref = fn(x.bfloat16().float(), r, w, b, hz, backend="reference")
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_ffn_mixed_inputs_lower():
    """x fp32 (a LayerNorm output), weights fp32, masks fp32 -> bf16 output; no dtype error."""
    fn, inputs = _ffn_case()
    with torch.autocast("cpu", torch.bfloat16):
        y = fn(inputs[0].bfloat16(), *inputs[1:], backend="native")
    assert y.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ mask ops

def _mask_calls():
    g = torch.Generator().manual_seed(3)
    la = torch.randn(2, 16, generator=g)
    u = torch.rand(2, 16, generator=g) * 0.98 + 0.01
    offsets = {"hidden": 0, "head": 8, "mha": 14, "intermediate": 16, "ffn": 22}
    step_la = torch.randn(24, generator=g)
    step_u = torch.rand(24, generator=g) * 0.98 + 0.01
    sizes = dict(num_layers=2, hidden_size=8, num_heads=3, intermediate_size=3)
    keep = torch.rand(2, 3, generator=g)
    return {
        "hard_concrete_sample": (lambda la, be: O.hard_concrete_sample(la, noise=u, backend=be), la),
        "hard_concrete_keep_prob": (lambda la, be: O.hard_concrete_keep_prob(la, backend=be), la),
        "hard_concrete_deterministic": (lambda la, be: O.hard_concrete_deterministic(la, backend=be), la),
        "expected_size": (lambda k, be: O.expected_size(head=k, num_layers=2, hidden_size=8, num_heads=3,
                                                        intermediate_size=4, backend=be)[0], keep),
        "hard_concrete_step": (lambda la, be: torch.cat([
            t.reshape(-1) for t in O.hard_concrete_step(la, offsets, noise=step_u, backend=be,
                                                        **sizes)]), step_la),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(_mask_calls()))
def test_mask_ops_run_in_fp32(op, backend):
    """fp32 inputs: bitwise the result without autocast. bf16 inputs: cast up, fp32 output, bf16 grad."""
    fn, la = _mask_calls()[op]
    plain = fn(la, backend)
    with torch.autocast("cpu", torch.bfloat16):
        got = fn(la, backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain, atol=0, rtol=0)
    x = la.bfloat16().requires_grad_(op != "hard_concrete_deterministic")
    with torch.autocast("cpu", torch.bfloat16):
        got = fn(x, backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(x.detach().float(), backend), atol=0, rtol=0)
    if x.requires_grad:
        got.sum().backward()
        assert x.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ the at::mm bug

def test_native_ffn_kernel_ignores_autocast():
    """Regression: under autocast the native kernel's internal at::mm returned bf16 while the epilogue
    wrote fp32 into it ("expected scalar type Float but found BFloat16" on CPU, heap corruption on
    CUDA). The kernels now exclude autocast and run in their inputs' dtype."""
    _, (x, w1, b1, w2, b2, int_z, mlp_z) = _ffn_case()
    x = x.reshape(-1, 16)
    args = (x, w1, b1, w2, b2, int_z, mlp_z.reshape(()), None, 0)
    y0, h0 = torch.ops.cofi.masked_ffn_fwd_native(*args)
    g = torch.randn_like(y0)
    grads0 = torch.ops.cofi.masked_ffn_bwd_native(g, *args[:-1], h0, 0, [True] * 7)
    with torch.autocast("cpu", torch.bfloat16):
        y1, h1 = torch.ops.cofi.masked_ffn_fwd_native(*args)
        grads1 = torch.ops.cofi.masked_ffn_bwd_native(g, *args[:-1], h1, 0, [True] * 7)
    assert y1.dtype == h1.dtype == torch.float32
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    for a, b in zip(grads1, grads0):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_native_attention_kernel_ignores_autocast():
    _, (q, k, v, z) = _attention_case()
    o0, l0 = torch.ops.cofi.masked_attention_fwd_native(q, k, v, z, None, 0.25, 0.0, None)
    with torch.autocast("cpu", torch.bfloat16):
        o1, l1 = torch.ops.cofi.masked_attention_fwd_native(q, k, v, z, None, 0.25, 0.0, None)
    assert o1.dtype == torch.float32
    torch.testing.assert_close(o1, o0, atol=0, rtol=0)


# ----------------------------------------------------------------------------- registration

def test_every_cofi_custom_op_has_a_policy():
    ops = {name.split("::", 1)[1] for name in OPDEFS if name.startswith("cofi::")}
    missing = sorted(ops - set(_autocast.POLICIES))
    assert not missing, f"cofi custom ops without an autocast policy: {missing}"
    assert ops <= set(_autocast.installed)


def test_opcheck_half_inputs():
    """The ops with the inputs their LOWER policy produces: schema, fake kernels (lse float32 for
    half q) and autograd registration agree with the native kernels."""
    _, (q, k, v, z) = _attention_case()
    dtype = torch.bfloat16
    q, k, v, z = (t.to(dtype).requires_grad_(True) for t in (q, k, v, z))
    torch.library.opcheck(torch.ops.cofi.masked_attention.default, (q, k, v, z, None, 0.25, 0.0, None, "native"))
    _, (x, w1, b1, w2, b2, int_z, mlp_z) = _ffn_case()
    args = [t.to(dtype).requires_grad_(True) for t in (x.reshape(-1, 16), w1, b1, w2, b2, int_z)]
    torch.library.opcheck(torch.ops.cofi.masked_ffn.default,
                          (*args, mlp_z.to(dtype).reshape(()), None, 0, "native"))


def test_compiled_under_autocast():
    """torch.compile traces the policy: the same dtype and values as eager."""
    _, (x, w1, b1, w2, b2, int_z, mlp_z) = _ffn_case()

    def f(x):
        with torch.autocast("cpu", torch.bfloat16):
            return O.masked_ffn(x, w1, b1, w2, b2, int_z, mlp_z, backend="native")

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
