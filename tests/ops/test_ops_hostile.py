"""Bad, odd and hostile inputs to every op: no silent wrong answer, and one clear error otherwise.

Regression tests of "No silent wrong answer": strided views BLAS cannot take as they are, no live FFN
unit, empty batches, NaN / out-of-range noise, unvalidated scalars and integer arguments, meta and
fake tensors, and direct ``torch.ops.cofi.*_native`` calls that bypass the Python wrappers.
"""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from cofi import _ext, ops
from cofi.ops import _backends as B
from cofi.ops.reference import hard_concrete_keep_prob_ref, hard_concrete_sample_ref
from cofi.ops.reference.masked_attention import masked_attention_core_ref

pytestmark = pytest.mark.skipif(not _ext.native_loaded(), reason="native extension not built")

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg.strip(), f"multi-line error: {msg!r}"
    return msg


# ============================== masked_attention: strides ==========================================

def _attn_views(kind: str, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [2, 3, 5, 4] with one of them a view whose row stride is below D (or D not unit-strided)."""
    Bsz, H, S, D = 2, 3, 5, 4
    r = lambda *shape, seed: rand(*shape, seed=seed, dtype=dtype)  # noqa: E731  (views made in dtype: .to copies)
    q, k, v = r(Bsz, H, S, D, seed=1), r(Bsz, H, S, D, seed=2), r(Bsz, H, S, D, seed=3)
    if kind == "expand_q":
        q = r(Bsz, H, 1, D, seed=4).expand(Bsz, H, S, D)
    elif kind == "broadcast_k":
        k = torch.broadcast_to(r(1, 1, 1, D, seed=5), (Bsz, H, S, D))
    elif kind == "unfold_v":
        v = r(Bsz, H, S + D - 1, seed=6).unfold(2, D, 1)  # windows overlap: row stride 1 < D
    elif kind == "as_strided_q":
        q = r(64, seed=7).as_strided((Bsz, H, S, D), (20, 6, 2, 1))  # rows overlap by 2 elements
    elif kind == "transposed_k":
        k = r(Bsz, H, D, S, seed=8).transpose(-1, -2)  # unit stride on S, not on D
    elif kind == "all_expanded":
        q, k, v = (r(1, 1, 1, D, seed=s).expand(Bsz, H, S, D) for s in (9, 10, 11))
    return q, k, v


ATTN_VIEWS = ["expand_q", "broadcast_k", "unfold_v", "as_strided_q", "transposed_k", "all_expanded"]


@pytest.mark.parametrize("kind", ATTN_VIEWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_views_with_short_row_stride(kind, dtype, padded):
    """Used to hand the row stride to BLAS as a leading dimension < D: MKL rejected it, out was garbage."""
    q, k, v = _attn_views(kind, dtype)
    z = torch.tensor([1.0, 0.5, 0.0], dtype=dtype)
    mask = torch.tensor([[True] * 5, [True, False, True, True, False]]) if padded else None
    outs = {}
    for backend in ("native", "reference"):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = ops.masked_attention(*leaves, z, mask, backend=backend)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        outs[backend] = (out, grads)
    again = ops.masked_attention(q, k, v, z, mask, backend="native")
    torch.testing.assert_close(again, outs["native"][0], atol=0, rtol=0)  # no call-to-call garbage
    torch.testing.assert_close(outs["native"][0], outs["reference"][0], **tol("masked_attention", "fwd", dtype))
    for a, b in zip(outs["native"][1], outs["reference"][1]):
        torch.testing.assert_close(a, b, **tol("masked_attention", "bwd", dtype))


@pytest.mark.parametrize("kind", ATTN_VIEWS)
def test_attention_direct_native_call_with_any_strides(kind):
    """torch.ops.cofi.masked_attention_*_native must be as safe as the wrapper."""
    q, k, v = _attn_views(kind)
    z = torch.tensor([1.0, 9.0, 0.5, 9.0, 2.0, 9.0], dtype=F64)[::2]  # non-contiguous head_z
    mask = torch.ones(5, 2, dtype=torch.bool).t()  # non-contiguous mask
    out, lse = torch.ops.cofi.masked_attention_fwd_native(q, k, v, z, mask, 0.5, 0.0, None)
    want, want_lse = masked_attention_core_ref(q, k, v, z, mask, 0.5, 0.0, None)
    torch.testing.assert_close(out, want, **tol("masked_attention", "fwd", F64))
    torch.testing.assert_close(lse, want_lse, **tol("masked_attention", "fwd", F64))
    grad = rand(5, 4, 2, 3, seed=12).permute(2, 3, 0, 1)  # non-contiguous grad
    got = torch.ops.cofi.masked_attention_bwd_native(grad, q, k, v, z, mask, out, lse, 0.5,
                                                     0.0, None)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, z)]
    ref_out = masked_attention_core_ref(*leaves, mask, 0.5, 0.0, None)[0]
    want_g = torch.autograd.grad(ref_out, leaves, grad)
    for a, b in zip(got, want_g):
        torch.testing.assert_close(a, b, **tol("masked_attention", "bwd", F64))


@pytest.mark.parametrize("fn,arg,value", [
    ("fwd", "scale", NAN), ("fwd", "scale", INF), ("fwd", "dropout_p", 1.0), ("fwd", "dropout_p", -0.1),
    ("bwd", "scale", NAN), ("bwd", "dropout_p", NAN),
])
def test_attention_direct_native_scalar_checks(fn, arg, value):
    q = rand(1, 2, 3, 4)
    scale, p = (value, 0.0) if arg == "scale" else (0.5, value)
    with pytest.raises(ValueError, match=arg) as e:
        if fn == "fwd":
            torch.ops.cofi.masked_attention_fwd_native(q, q, q, None, None, scale, p, torch.zeros(2, dtype=torch.long))
        else:
            out, lse = torch.ops.cofi.masked_attention_fwd_native(q, q, q, None, None, 0.5, 0.0, None)
            torch.ops.cofi.masked_attention_bwd_native(q, q, q, q, None, None, out, lse, scale, p,
                                                       torch.zeros(2, dtype=torch.long))
    one_line(e)


# ============================== masked_ffn: no live unit ===========================================

FFN_BACKENDS = [b for b in ("native", "reference", "triton") if not B.impl("masked_ffn", b).reasons(rand(1, 4))]


@pytest.mark.parametrize("backend", FFN_BACKENDS)
@pytest.mark.parametrize("case", ["int_z_zero", "zero_width", "empty_live_idx"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_mlp_z", [False, True])
def test_ffn_without_live_unit(backend, case, rows, with_mlp_z):
    """Used to raise an aliasing error with one row (the output was a view of b2)."""
    d, F = 4, 0 if case == "zero_width" else 3
    x = rand(rows, d, seed=1).requires_grad_(True)
    w1, b1, w2 = rand(F, d, seed=2), rand(F, seed=3), rand(d, F, seed=4)
    b2 = rand(d, seed=5).requires_grad_(True)
    int_z = torch.zeros(F, dtype=F64) if case == "int_z_zero" else None
    live_idx = torch.zeros(0, dtype=torch.long) if case == "empty_live_idx" else None
    mlp_z = torch.tensor([0.7], dtype=F64, requires_grad=True) if with_mlp_z else None
    y = ops.masked_ffn(x, w1, b1, w2, b2, int_z, mlp_z, backend=backend, live_idx=live_idx)
    m = 0.7 if with_mlp_z else 1.0
    torch.testing.assert_close(y, (b2 * m).expand(rows, d).detach(), **tol("masked_ffn", "fwd", F64))
    assert y.data_ptr() != b2.data_ptr()
    leaves = [x, b2] + ([mlp_z] if with_mlp_z else [])
    gx, gb2, *gm = torch.autograd.grad(y, leaves, torch.ones_like(y))
    torch.testing.assert_close(gx, torch.zeros_like(x), atol=0, rtol=0)
    torch.testing.assert_close(gb2, torch.full_like(b2, rows * m), **tol("masked_ffn", "bwd", F64))
    if with_mlp_z:
        torch.testing.assert_close(gm[0], (b2.detach().sum() * rows).reshape(1), **tol("masked_ffn", "bwd", F64))


def test_ffn_direct_native_without_live_unit_returns_fresh_tensor():
    x, b2 = rand(1, 4), rand(4, seed=1)
    y, h = torch.ops.cofi.masked_ffn_fwd_native(x, rand(0, 4), rand(0), rand(4, 0), b2, None, None, None, 0)
    assert y.shape == (1, 4) and h.shape == (1, 0)
    assert y.data_ptr() != b2.data_ptr()
    torch.testing.assert_close(y[0], b2, atol=0, rtol=0)


# ============================== masked_layer_norm: empty sizes =====================================

@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("hidden_z", ["none", "ones", "zeros"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("lead", [(0,), (0, 3), (2, 0)])
def test_layer_norm_empty_batch(backend, hidden_z, residual, lead):
    """The reference (the CPU path for fp16 / bf16) indexed row 0 of an empty batch."""
    if B.impl("masked_layer_norm", backend).reasons(rand(1, 4)):
        pytest.skip(f"{backend} cannot run here")
    d = 4
    x = torch.zeros(*lead, d, dtype=F64, requires_grad=True)
    r = torch.zeros(*lead, d, dtype=F64, requires_grad=True) if residual else None
    w, b = rand(d).requires_grad_(True), rand(d, seed=1).requires_grad_(True)
    z = {"none": None, "ones": torch.ones(d, dtype=F64), "zeros": torch.zeros(d, dtype=F64)}[hidden_z]
    y = ops.masked_layer_norm(x, r, w, b, z, backend=backend)
    assert y.shape == x.shape
    leaves = [x, w, b] + ([r] if residual else [])
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape
    assert (grads[1] == 0).all() and (grads[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_empty_batch_half_on_cpu(dtype):
    x = torch.zeros(0, 8, dtype=dtype, requires_grad=True)
    w, b = torch.ones(8, dtype=dtype, requires_grad=True), torch.zeros(8, dtype=dtype)
    y = ops.masked_layer_norm(x, None, w, b)
    assert y.shape == (0, 8) and ops.last_backend("masked_layer_norm") == "reference"
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    assert gx.shape == (0, 8) and (gw == 0).all()


def test_layer_norm_eps_validated():
    x = rand(2, 4)
    for bad in (NAN, INF, -1.0):
        with pytest.raises(ValueError, match="eps") as e:
            ops.masked_layer_norm(x, None, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64), eps=bad)
        one_line(e)
        with pytest.raises(ValueError, match="eps"):
            torch.ops.cofi.masked_layer_norm_fwd_native(x, None, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64),
                                                        None, bad)


# ============================== hard concrete: NaN / out-of-range noise =============================

NOISE = [0.5, NAN, 1.5, -0.2, 0.0, 1.0, 1e-6, 1 - 1e-6, -0.0, INF, -INF]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_noise_outside_open_interval_matches_reference(dtype):
    """u must be in (0, 1): NaN or out-of-range noise gives NaN gates where the reference does (native
    used to clamp them to silent 0 / 1 gates)."""
    n = len(NOISE)
    la = torch.linspace(-3, 3, n, dtype=dtype)
    u = torch.tensor(NOISE, dtype=dtype)
    for backend in ("native", "reference"):
        leaf = la.clone().requires_grad_(True)
        z = ops.hard_concrete_sample(leaf, noise=u, backend=backend)
        (g,) = torch.autograd.grad(z, leaf, torch.ones_like(z))
        if backend == "native":
            zn, gn = z, g
    want = hard_concrete_sample_ref(la, u)
    torch.testing.assert_close(zn, want, equal_nan=True, **tol("hard_concrete", "fwd", dtype))
    assert torch.isnan(zn).tolist() == [math.isnan(v) or not 0 <= v <= 1 for v in NOISE]
    torch.testing.assert_close(gn, g, equal_nan=True, **tol("hard_concrete", "bwd", dtype))
    assert torch.isfinite(gn).all()  # outside the clip (NaN gates included) the gradient is 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_noise_outside_open_interval_matches_reference(dtype):
    n = len(NOISE)
    la = torch.linspace(-3, 3, n + 1, dtype=dtype)
    u = torch.tensor(NOISE + [0.3], dtype=dtype)
    sizes = dict(num_layers=1, hidden_size=2, num_heads=3, intermediate_size=2)
    res = {}
    for backend in ("native", "reference"):
        leaf = la.clone().requires_grad_(True)
        r = ops.hard_concrete_step(leaf, {"head": 0, "hidden": 3}, noise=u, backend=backend, **sizes)
        (g,) = torch.autograd.grad(r.z.sum() + r.keep.sum() + r.expected_params, leaf)
        res[backend] = (r.z, g)
    torch.testing.assert_close(res["native"][0], res["reference"][0], equal_nan=True,
                               **tol("hard_concrete", "fwd", dtype))
    torch.testing.assert_close(res["native"][1], res["reference"][1], **tol("expected_size", "bwd", dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_native_backward_nonfinite_upstream_gradient_is_zero_outside_clip(dtype):
    """where(inside, g * dz, 0) as the reference's autograd: a NaN/inf upstream gradient gives 0
    where the clip (sample) or the clamp (keep prob) is active, in every dtype (float64 used to give
    NaN)."""
    t, l, r, eps = 2 / 3, -0.1, 1.1, 1e-6
    la = torch.tensor([-30.0, 30.0, 0.0, 0.0], dtype=dtype)  # clipped low, clipped high, interior x2
    u = torch.full_like(la, 0.5)
    g = torch.tensor([NAN, INF, 1.0, 2.0], dtype=dtype)
    for native, ref in (
            (torch.ops.cofi.hard_concrete_sample_bwd_native(g, la, u, t, l, r),
             lambda x: hard_concrete_sample_ref(x, u, t, l, r)),
            (torch.ops.cofi.hard_concrete_keep_prob_bwd_native(g, la, t, l, r, eps),
             lambda x: hard_concrete_keep_prob_ref(x, t, l, r, eps))):
        leaf = la.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(ref(leaf), leaf, g)
        assert native[:2].tolist() == [0.0, 0.0]
        torch.testing.assert_close(native, want, **tol("hard_concrete", "bwd", dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_native_nan_log_alpha_propagates_like_reference(dtype):
    la = torch.tensor([0.0, NAN, 2.0, -INF, INF], dtype=dtype)
    u = torch.full_like(la, 0.3)
    t, l, r, eps = 2 / 3, -0.1, 1.1, 1e-6
    z = torch.ops.cofi.hard_concrete_sample_fwd_native(la, u, t, l, r)
    torch.testing.assert_close(z, hard_concrete_sample_ref(la, u, t, l, r), equal_nan=True)
    p = torch.ops.cofi.hard_concrete_keep_prob_fwd_native(la, t, l, r, eps)
    torch.testing.assert_close(p, hard_concrete_keep_prob_ref(la, t, l, r, eps), equal_nan=True)
    g = torch.ones_like(la)
    assert torch.isfinite(torch.ops.cofi.hard_concrete_sample_bwd_native(g, la, u, t, l, r)).all()
    assert torch.isfinite(torch.ops.cofi.hard_concrete_keep_prob_bwd_native(g, la, t, l, r, eps)).all()
    rows = torch.tensor([[NAN, 1.0, -1.0]], dtype=dtype)
    assert torch.ops.cofi.hard_concrete_deterministic_native(rows, True, t, l, r, eps).shape == (1, 3)


# ============================== hard concrete: scalar and integer arguments ========================

def _hc_call(op: str, **kw):
    la = torch.linspace(-2, 2, 12, dtype=F64)
    sizes = dict(num_layers=2, hidden_size=2, num_heads=3, intermediate_size=2)
    if op == "sample":
        return ops.hard_concrete_sample(la, **kw)
    if op == "keep_prob":
        return ops.hard_concrete_keep_prob(la, **kw)
    if op == "deterministic":
        return ops.hard_concrete_deterministic(la.reshape(3, 4), **kw)
    if op == "step":
        return ops.hard_concrete_step(la, kw.pop("offsets", {"head": 0}), **{**sizes, **kw})
    if op == "expected_size":
        return ops.expected_size(head=torch.rand(2, 3, dtype=F64), **{**sizes, **kw})
    raise AssertionError(op)


SCALAR_CASES = [
    (op, arg, value)
    for op in ("sample", "keep_prob", "deterministic", "step")
    for arg, values in (("temperature", (0.0, -1.0, NAN, INF)), ("limit_l", (0.0, 0.5, NAN, -INF)),
                        ("limit_r", (1.0, 0.5, NAN, INF)))
    for value in values
] + [(op, "eps", v) for op in ("sample", "keep_prob", "deterministic", "step") for v in (0.0, 0.6, NAN, INF, -1e-6)]


@pytest.mark.parametrize("op,arg,value", SCALAR_CASES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_hard_concrete_scalar_args_validated(op, arg, value, backend):
    """Every backend refuses the same scalars (native and reference used to disagree for eps=NaN)."""
    with pytest.raises(ValueError, match=f"{arg} must") as e:
        _hc_call(op, backend=backend, **{arg: value})
    msg = one_line(e)
    assert msg.startswith(f"cofi.ops.hard_concrete_{op}: ")


@pytest.mark.parametrize("op,arg,value", [
    ("sample", "temperature", True), ("keep_prob", "eps", "1e-6"), ("deterministic", "limit_r", None),
    ("sample", "limit_l", torch.tensor(-0.1)),
])
def test_hard_concrete_scalar_args_type(op, arg, value):
    with pytest.raises(TypeError, match=f"{arg} must be a real number, got") as e:
        _hc_call(op, **{arg: value})
    one_line(e)


@pytest.mark.parametrize("op", ["step", "expected_size"])
@pytest.mark.parametrize("arg", ["num_layers", "hidden_size", "num_heads", "intermediate_size"])
@pytest.mark.parametrize("value", [2.0, 2.5, True, "2", torch.tensor(2)])
def test_integer_sizes_refuse_non_integers(op, arg, value):
    """Floats were silently truncated (2.7 layers -> 2), bools taken as 0 / 1."""
    with pytest.raises(TypeError, match=f"{arg} must be an int, got {type(value).__name__}") as e:
        _hc_call(op, **{arg: value})
    one_line(e)


@pytest.mark.parametrize("value", [0.0, 1.5, True, None, "0"])
def test_step_offsets_refuse_non_integers(value):
    with pytest.raises(TypeError, match=r"offsets\['head'\] must be an int, got") as e:
        _hc_call("step", offsets={"head": value})
    one_line(e)


def test_step_offsets_must_be_a_mapping():
    with pytest.raises(TypeError, match="offsets must be a mapping"):
        _hc_call("step", offsets=[0, -1, -1, -1, -1])


def test_integer_args_accept_numpy_ints():
    np = pytest.importorskip("numpy")
    r = _hc_call("step", num_layers=np.int64(2), offsets={"head": np.int32(0)})
    assert r.z.shape == (12,)


@pytest.mark.parametrize("call", [
    lambda la: torch.ops.cofi.hard_concrete_sample_fwd_native(la, la.clamp(0.1, 0.9), 0.0, -0.1, 1.1),
    lambda la: torch.ops.cofi.hard_concrete_sample_bwd_native(la, la, la.clamp(0.1, 0.9), 2 / 3, NAN, 1.1),
    lambda la: torch.ops.cofi.hard_concrete_keep_prob_fwd_native(la, 2 / 3, -0.1, 1.1, NAN),
    lambda la: torch.ops.cofi.hard_concrete_keep_prob_bwd_native(la, la, 2 / 3, -0.1, INF, 1e-6),
    lambda la: torch.ops.cofi.hard_concrete_deterministic_native(la.reshape(1, -1), False, 2 / 3, -0.1, 1.1, NAN),
    lambda la: torch.ops.cofi.hard_concrete_step_fwd_native(la, la.clamp(0.1, 0.9), [0, -1, -1, -1, -1], 1, 6, 1, 1,
                                                             2 / 3, -0.1, 1.1, 0.0),
    lambda la: torch.ops.cofi.hard_concrete_step_fwd_native(la, la.clamp(0.1, 0.9), [0, -1, -1, -1, -1], -1, 6, 1, 1,
                                                             2 / 3, -0.1, 1.1, 1e-6),
], ids=["sample_t0", "sample_bwd_l_nan", "keep_eps_nan", "keep_bwd_r_inf", "det_eps_nan", "step_eps0", "step_L_neg"])
def test_direct_native_scalar_checks(call):
    with pytest.raises(ValueError, match="cofi::") as e:
        call(torch.linspace(-1, 1, 6, dtype=F64))
    one_line(e)


def test_direct_native_expected_size_checks_group_shapes():
    """The kernel read L x H values from whatever head it was given (out of bounds for a short one)."""
    f = torch.ops.cofi.expected_size_fwd_native
    with pytest.raises(ValueError, match="head must have shape"):
        f(None, torch.ones(1, dtype=F64), None, None, None, 100, 4, 3, 5)
    with pytest.raises(ValueError, match="intermediate must have shape"):
        torch.ops.cofi.expected_size_bwd_native(torch.ones((), dtype=F64), torch.zeros((), dtype=F64), None, None,
                                                None, torch.ones(2, 4, dtype=F64), None, 2, 4, 3, 5)
    with pytest.raises(ValueError, match="mha must match"):
        f(None, torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=torch.float32), None, None, 2, 4, 3, 5)
    with pytest.raises(ValueError, match="must be > 0"):
        f(None, torch.ones(0, 3, dtype=F64), None, None, None, 0, 4, 3, 5)


def test_direct_native_step_backward_checks_grad_sizes():
    """grad_keep shorter than log_alpha was written past its end."""
    la = torch.linspace(-1, 1, 8, dtype=F64)
    u = torch.full_like(la, 0.5)
    args = ([0, -1, -1, -1, -1], 2, 4, 3, 5, 2 / 3, -0.1, 1.1, 1e-6)
    z, keep, _, _ = torch.ops.cofi.hard_concrete_step_fwd_native(la, u, *args)
    one = torch.ones((), dtype=F64)
    with pytest.raises(RuntimeError, match="grad_keep"):
        torch.ops.cofi.hard_concrete_step_bwd_native(None, torch.ones(2, dtype=F64), one, one, la, u, z, keep, *args)
    with pytest.raises(ValueError, match="grad_params"):
        torch.ops.cofi.hard_concrete_step_bwd_native(None, None, torch.ones(3, dtype=F64), one, la, u, z, keep, *args)


# ============================== meta and fake tensors ==============================================

def _run_all_ops(device: str) -> dict[str, tuple[int, ...]]:
    """Every public op (forward and backward) on ``device``; returns the output shapes."""
    kw = dict(device=device, dtype=torch.float32)
    shapes = {}
    la = torch.zeros(26, **kw, requires_grad=True)
    z = ops.hard_concrete_sample(la)
    keep = ops.hard_concrete_keep_prob(la)
    (z.sum() + keep.sum()).backward()
    shapes["sample"], shapes["keep"] = tuple(z.shape), tuple(keep.shape)
    shapes["deterministic"] = tuple(ops.hard_concrete_deterministic(torch.zeros(2, 5, **kw)).shape)
    r = ops.hard_concrete_step(la, {"head": 0, "hidden": 6}, num_layers=2, hidden_size=4, num_heads=3,
                               intermediate_size=4)
    (r.z.sum() + r.expected_params).backward()
    shapes["step"] = tuple(r.z.shape)
    e, s = ops.expected_size(num_layers=2, hidden_size=4, num_heads=3, intermediate_size=4,
                             head=torch.zeros(2, 3, **kw, requires_grad=True))
    shapes["expected_size"] = tuple(e.shape)
    q = torch.zeros(2, 3, 5, 4, **kw, requires_grad=True)
    o = ops.masked_attention(q, q, q, torch.ones(3, **kw), torch.ones(2, 5, dtype=torch.bool, device=device))
    o.sum().backward()
    shapes["attention"] = tuple(o.shape)
    x = torch.zeros(3, 4, **kw, requires_grad=True)
    y = ops.masked_ffn(x, torch.zeros(6, 4, **kw), torch.zeros(6, **kw), torch.zeros(4, 6, **kw), torch.zeros(4, **kw),
                       torch.ones(6, **kw), torch.ones(1, **kw))
    y.sum().backward()
    shapes["ffn"] = tuple(y.shape)
    n = ops.masked_layer_norm(x, x, torch.ones(4, **kw), torch.zeros(4, **kw), torch.ones(4, **kw))
    n.sum().backward()
    shapes["layer_norm"] = tuple(n.shape)
    return shapes


WANT_SHAPES = {"sample": (26,), "keep": (26,), "deterministic": (2, 5), "step": (26,), "expected_size": (),
               "attention": (2, 3, 5, 4), "ffn": (3, 4), "layer_norm": (3, 4)}


def test_every_op_on_meta_tensors():
    """Hard-concrete ops used to call .item() (the log_alpha NaN check) on meta tensors."""
    assert _run_all_ops("meta") == WANT_SHAPES


def test_every_op_under_fake_tensor_mode():
    # a ShapeEnv as under torch.compile: masked_ffn's saved h has a data-dependent width
    with FakeTensorMode(shape_env=ShapeEnv(allow_dynamic_output_shape_ops=True)):
        assert _run_all_ops("cpu") == WANT_SHAPES


# ============================== found by the hostile-input sweep ===================================

@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 1.7, 123.4])
@pytest.mark.parametrize("masked", [False, True])
def test_layer_norm_constant_row_normalises_to_zero(backend, dtype, value, masked):
    """A row constant over its kept dims used to give rounding noise times 1/sqrt(eps) (up to ~1 with
    eps=1e-12) in both native and reference; torch.layer_norm gives exactly the bias."""
    d = 768
    x = torch.full((2, d), value, dtype=dtype)
    w, b = torch.ones(d, dtype=dtype), rand(d, dtype=dtype)
    z = torch.ones(d, dtype=dtype)
    if masked:
        z[::3] = 0.0
        x[:, ::3] = -5.0  # pruned dims do not count: the kept dims are still constant
    y = ops.masked_layer_norm(x, None, w, b, z if masked else None, backend=backend)
    torch.testing.assert_close(y, (b * z).expand(2, d), atol=1e-6, rtol=0)


def test_ffn_live_idx_outside_units_refused():
    x, w1, b1, w2, b2 = rand(2, 4), rand(6, 4), rand(6), rand(4, 6), rand(4)
    for bad in ([0, 6], [-1]):
        with pytest.raises(ValueError, match=r"live_idx must index units in \[0, 6\)") as e:
            ops.masked_ffn(x, w1, b1, w2, b2, live_idx=torch.tensor(bad))
        one_line(e)
        with pytest.raises(ValueError, match=r"live must index units in \[0, 6\)"):
            torch.ops.cofi.masked_ffn_fwd_native(x, w1, b1, w2, b2, None, None, torch.tensor(bad), 0)


def test_sample_generator_type_checked():
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str") as e:
        ops.hard_concrete_sample(rand(3), generator="seed")
    one_line(e)


def test_unknown_backend_name_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^cofi.ops: backend must be one of .*, got 'cuda'$"):
        ops.hard_concrete_keep_prob(rand(3), backend="cuda")


@pytest.mark.parametrize("value", [True, "0.5", torch.tensor(0.5)])
def test_attention_scale_must_be_a_real_number(value):
    """bool and str were taken through float() (scale=True meant 1.0)."""
    q = rand(1, 1, 2, 4)
    with pytest.raises(TypeError, match="scale must be a real number"):
        ops.masked_attention(q, q, q, scale=value)
