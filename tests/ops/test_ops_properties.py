"""Property tests: the native backend equals the reference backend on random inputs of every op.

Random shapes (empty sizes included), random masks (all-zero, all-one, mixed), float32 and float64,
and arbitrary strides for every tensor argument and for the output gradient: contiguous, permuted
(transposed), stepped slices, expanded (stride 0, ``expand`` / ``broadcast_to``), overlapping windows
(``unfold`` / ``as_strided``) and fully random strides. Forward outputs and gradients must agree
within tests/_tolerances.py, and be finite exactly where the reference is. Bounded and derandomized:
a fixed example set, no example database.
"""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cofi import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.native_loaded(), reason="native extension not built")

BACKENDS = ("native", "reference")
DTYPES = st.sampled_from([torch.float32, torch.float64])
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYOUTS = ("contiguous", "permuted", "stepped", "expanded", "overlapping", "random")


# ============================== strided inputs =====================================================

def natural_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return strides[::-1]


def draw_strides(draw: st.DrawFn, shape: tuple[int, ...]) -> list[int]:
    """Element strides for a view of ``shape`` in one of LAYOUTS (any non-negative strides)."""
    nd = len(shape)
    kind = draw(st.sampled_from(LAYOUTS)) if nd else "contiguous"
    if kind == "contiguous":
        return natural_strides(shape)
    if kind == "permuted":  # a contiguous tensor of permuted shape, permuted back (e.g. a transpose)
        perm = draw(st.permutations(range(nd)))
        inner = natural_strides(tuple(shape[p] for p in perm))
        out = [0] * nd
        for i, p in enumerate(perm):
            out[p] = inner[i]
        return out
    if kind == "stepped":  # x[..., ::step] of a larger tensor
        steps = [draw(st.integers(1, 3)) for _ in range(nd)]
        big = natural_strides(tuple(n * s for n, s in zip(shape, steps)))
        return [b * s for b, s in zip(big, steps)]
    if kind == "expanded":  # size-1 dims expanded to full size: stride 0
        zero = draw(st.lists(st.booleans(), min_size=nd, max_size=nd))
        return [0 if z else s for z, s in zip(zero, natural_strides(shape))]
    if kind == "overlapping":  # rows overlap: the second-to-last stride is below the last dim's size
        out = natural_strides(shape)
        if nd >= 2:
            out[-2] = draw(st.integers(0, max(shape[-1] - 1, 0)))
        return out
    return [draw(st.integers(0, 7)) for _ in range(nd)]


def strided(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, *, seed: int, scale: float = 1.0,
            uniform: bool = False) -> torch.Tensor:
    """A leaf-backed view of ``shape`` with drawn strides and random values (normal, or U(0.02, 0.98))."""
    strides = draw_strides(draw, shape)
    storage = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(shape) else 1
    g = torch.Generator().manual_seed(seed)
    if uniform:
        base = torch.rand(storage, generator=g, dtype=torch.float64) * 0.96 + 0.02
    else:
        base = torch.randn(storage, generator=g, dtype=torch.float64) * scale
    return base.to(dtype).as_strided(shape, strides)


def inputs(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Fresh differentiable copies of the views (same strides) for one backend's call."""
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        base = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.element_size(),))
        leaf = base.detach().clone().requires_grad_(True)
        out.append(leaf.as_strided(t.shape, t.stride(), t.storage_offset()))
    return out


def draw_mask(draw: st.DrawFn, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor | None:
    """None, all-zero, all-one or mixed gates of length n (mixed: random in (0, 1.5) with exact zeros)."""
    kind = draw(st.sampled_from(["none", "zeros", "ones", "mixed"]))
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype)
    if kind == "ones":
        return torch.ones(n, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 1.5
    z[torch.rand(n, generator=g) < 0.4] = 0.0
    return z.to(dtype)


def grads(out: torch.Tensor | tuple[torch.Tensor, ...], wrt: list[torch.Tensor | None], grad_out) -> list:
    """d(sum out * grad_out)/d wrt for the differentiable entries (None for the others)."""
    outs = out if isinstance(out, tuple) else (out,)
    gos = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    live = [t for t in wrt if t is not None and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, gos) if o.requires_grad]
    if not live or not pairs:
        return [None if t is None else torch.zeros_like(t) for t in wrt]
    got = iter(torch.autograd.grad([o for o, _ in pairs], live, [g for _, g in pairs], allow_unused=True))
    res = []
    for t in wrt:
        if t is None or not t.requires_grad:
            res.append(None)
            continue
        g = next(got)
        res.append(torch.zeros_like(t) if g is None else g)
    return res


def assert_same(op: str, direction: str, dtype: torch.dtype, got, want, what: str) -> None:
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}[{i}]: one backend has no value"
            continue
        assert a.shape == b.shape, f"{what}[{i}]: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{what}[{i}]: finite where the reference is not"
        torch.testing.assert_close(a, b, equal_nan=True, **tol(op, direction, dtype),
                                   msg=lambda m, i=i: f"{what}[{i}]: {m}")


# ============================== masked_attention ==================================================

@SETTINGS
@given(st.data())
def test_masked_attention_native_equals_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    Bsz, H, S, D = draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.integers(0, 6)), draw(st.integers(0, 5))
    shape = (Bsz, H, S, D)
    q, k, v = (strided(draw, shape, dtype, seed=i) for i in range(3))
    head_z = draw_mask(draw, H, dtype, seed=3)
    mask_kind = draw(st.sampled_from(["none", "all", "empty", "mixed"]))
    mask = None
    if mask_kind != "none":
        mask = torch.rand(Bsz, S, generator=torch.Generator().manual_seed(4)) < 0.6
        mask = mask.fill_(mask_kind == "all") if mask_kind != "mixed" else mask
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.3]))
    grad_out = strided(draw, shape, dtype, seed=5)
    res = {}
    for backend in BACKENDS:
        qq, kk, vv, zz = inputs(q, k, v, head_z)
        out = ops.masked_attention(qq, kk, vv, zz, mask, dropout_p=dropout_p,
                                   generator=torch.Generator().manual_seed(6), backend=backend)
        assert ops.last_backend("masked_attention") == backend
        res[backend] = (out, grads(out, [qq, kk, vv, zz], grad_out))
    what = f"attention {shape} {dtype} z={head_z} mask={mask_kind} p={dropout_p} strides={[t.stride() for t in (q, k, v)]}"
    assert_same("masked_attention", "fwd", dtype, res["native"][0], res["reference"][0], what)
    assert_same("masked_attention", "bwd", dtype, res["native"][1], res["reference"][1], what)


# ============================== masked_ffn ========================================================

@SETTINGS
@given(st.data())
def test_masked_ffn_native_equals_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    lead = draw(st.sampled_from([(), (1,), (3,)])) + (draw(st.integers(0, 4)),)
    d, F = draw(st.integers(1, 5)), draw(st.integers(0, 6))
    x = strided(draw, lead + (d,), dtype, seed=0)
    w1, b1 = strided(draw, (F, d), dtype, seed=1, scale=0.5), strided(draw, (F,), dtype, seed=2)
    w2, b2 = strided(draw, (d, F), dtype, seed=3, scale=0.5), strided(draw, (d,), dtype, seed=4)
    int_z = draw_mask(draw, F, dtype, seed=5)
    mlp_kind = draw(st.sampled_from(["none", "zero", "one", "rand"]))
    mlp_z = None if mlp_kind == "none" else torch.tensor(
        {"zero": 0.0, "one": 1.0, "rand": 0.7}[mlp_kind], dtype=dtype).reshape(draw(st.sampled_from([(), (1,)])))
    live_idx = None
    if int_z is not None and draw(st.booleans()):
        live_idx = torch.nonzero(int_z).flatten()  # what a caller with host-side masks passes
    activation = draw(st.sampled_from(["gelu", "gelu_tanh", "relu"]))
    grad_out = strided(draw, lead + (d,), dtype, seed=6)
    res = {}
    for backend in BACKENDS:
        args = inputs(x, w1, b1, w2, b2, int_z, mlp_z)
        y = ops.masked_ffn(*args, activation=activation, backend=backend, live_idx=live_idx)
        assert ops.last_backend("masked_ffn") == backend
        res[backend] = (y, grads(y, args, grad_out))
    what = f"ffn {lead}+{d} F={F} {dtype} int_z={int_z} mlp_z={mlp_kind} live={live_idx} {activation}"
    assert_same("masked_ffn", "fwd", dtype, res["native"][0], res["reference"][0], what)
    assert_same("masked_ffn", "bwd", dtype, res["native"][1], res["reference"][1], what)


# ============================== masked_layer_norm =================================================

@SETTINGS
@given(st.data())
def test_masked_layer_norm_native_equals_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    lead = draw(st.sampled_from([(), (2,), (0,)])) + (draw(st.integers(0, 4)),)
    d = draw(st.integers(1, 6))
    x = strided(draw, lead + (d,), dtype, seed=0)
    residual = strided(draw, lead + (d,), dtype, seed=1) if draw(st.booleans()) else None
    weight, bias = strided(draw, (d,), dtype, seed=2), strided(draw, (d,), dtype, seed=3)
    hidden_z = draw_mask(draw, d, dtype, seed=4)
    eps = draw(st.sampled_from([1e-12, 1e-5, 1e-1]))
    grad_out = strided(draw, lead + (d,), dtype, seed=5)
    res = {}
    for backend in BACKENDS:
        args = inputs(x, residual, weight, bias, hidden_z)
        y = ops.masked_layer_norm(*args, eps=eps, backend=backend)
        assert ops.last_backend("masked_layer_norm") == backend
        res[backend] = (y, grads(y, args, grad_out))
    what = f"layer_norm {lead}+{d} {dtype} residual={residual is not None} z={hidden_z}"
    assert_same("masked_layer_norm", "fwd", dtype, res["native"][0], res["reference"][0], what)
    assert_same("masked_layer_norm", "bwd", dtype, res["native"][1], res["reference"][1], what)


# ============================== hard concrete family ==============================================

SPECIAL_NOISE = [0.0, 1.0, float("nan"), -0.25, 1.25]


def draw_noise(draw: st.DrawFn, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """u in (0, 1) with drawn strides; sometimes with values outside (0, 1) or NaN (-> NaN gates)."""
    u = strided(draw, shape, dtype, seed=seed, uniform=True)
    if u.numel() and draw(st.booleans()):
        u = u.clone(memory_format=torch.contiguous_format)  # distinct elements to overwrite
        flat = u.view(-1)
        for i in draw(st.lists(st.integers(0, u.numel() - 1), max_size=3)):
            flat[i] = draw(st.sampled_from(SPECIAL_NOISE))
    return u


@SETTINGS
@given(st.data())
def test_hard_concrete_sample_and_keep_prob_native_equal_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    la = strided(draw, shape, dtype, seed=0, scale=3.0)
    u = draw_noise(draw, shape, dtype, seed=1)
    temperature = draw(st.sampled_from([2.0 / 3.0, 0.1, 5.0]))
    eps = draw(st.sampled_from([1e-6, 0.1]))
    g_z, g_p = strided(draw, shape, dtype, seed=2), strided(draw, shape, dtype, seed=3)
    res = {}
    for backend in BACKENDS:
        (a,) = inputs(la)
        z = ops.hard_concrete_sample(a, temperature, eps=eps, noise=u, backend=backend)
        p = ops.hard_concrete_keep_prob(a, temperature, eps=eps, backend=backend)
        res[backend] = ((z, p), grads((z, p), [a], (g_z, g_p)))
    what = f"sample/keep {shape} {dtype} t={temperature} eps={eps} strides={la.stride()}"
    assert_same("hard_concrete", "fwd", dtype, res["native"][0], res["reference"][0], what)
    assert_same("hard_concrete", "bwd", dtype, res["native"][1], res["reference"][1], what)


@SETTINGS
@given(st.data())
def test_hard_concrete_deterministic_native_equals_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    shape = draw(st.sampled_from([(), (draw(st.integers(0, 7)),), (draw(st.integers(0, 3)), draw(st.integers(0, 7)))]))
    la = strided(draw, shape, dtype, seed=0, scale=3.0)  # expanded rows: all ties, broken by lower index
    mode = draw(st.sampled_from(["soft", "binary"]))
    out = {b: ops.hard_concrete_deterministic(la, mode, backend=b) for b in BACKENDS}
    assert_same("hard_concrete", "fwd", dtype, out["native"], out["reference"],
                f"deterministic {shape} {dtype} {mode} strides={la.stride()}")


SIZES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))  # L, d, H, F
GROUP_SHAPES = lambda L, d, H, F: {"hidden": (d,), "head": (L, H), "mha": (L,), "intermediate": (L, F), "ffn": (L,)}  # noqa: E731


@SETTINGS
@given(st.data())
def test_expected_size_native_equals_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    L, d, H, F = draw(SIZES)
    names = draw(st.lists(st.sampled_from(list(GROUP_SHAPES(L, d, H, F))), min_size=1, max_size=5, unique=True))
    groups = {n: strided(draw, GROUP_SHAPES(L, d, H, F)[n], dtype, seed=i, uniform=True) for i, n in enumerate(names)}
    g_e, g_s = torch.randn((), dtype=dtype), torch.randn((), dtype=dtype)
    res = {}
    for backend in BACKENDS:
        ins = dict(zip(groups, inputs(*groups.values())))
        e, s = ops.expected_size(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, backend=backend, **ins)
        res[backend] = ((e, s), grads((e, s), list(ins.values()), (g_e, g_s)))
    what = f"expected_size {(L, d, H, F)} {dtype} groups={names}"
    assert_same("expected_size", "fwd", dtype, res["native"][0], res["reference"][0], what)
    assert_same("expected_size", "bwd", dtype, res["native"][1], res["reference"][1], what)


@SETTINGS
@given(st.data())
def test_hard_concrete_step_native_equals_reference(data):
    draw = data.draw
    dtype = draw(DTYPES)
    L, d, H, F = draw(SIZES)
    shapes = GROUP_SHAPES(L, d, H, F)
    names = draw(st.permutations(list(shapes)))[: draw(st.integers(1, 5))]
    offsets, pos = {}, draw(st.integers(0, 2))
    for n in names:  # groups in drawn order with drawn gaps (elements outside every group are sampled only)
        offsets[n] = pos
        pos += math.prod(shapes[n]) + draw(st.integers(0, 2))
    la = strided(draw, (pos,), dtype, seed=0, scale=3.0)
    u = draw_noise(draw, (pos,), dtype, seed=1)
    g_z, g_p = strided(draw, (pos,), dtype, seed=2), strided(draw, (pos,), dtype, seed=3)
    g_e, g_s = torch.randn((), dtype=dtype), torch.randn((), dtype=dtype)
    res = {}
    for backend in BACKENDS:
        (a,) = inputs(la)
        r = ops.hard_concrete_step(a, offsets, num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, noise=u,
                                   backend=backend)
        assert ops.last_backend("hard_concrete_step") == backend
        res[backend] = (tuple(r), grads(tuple(r), [a], (g_z, g_p, g_e, g_s)))
    what = f"step {(L, d, H, F)} {dtype} offsets={offsets} n={pos} strides={la.stride()}"
    assert_same("hard_concrete", "fwd", dtype, res["native"][0][:2], res["reference"][0][:2], what)
    assert_same("expected_size", "fwd", dtype, res["native"][0][2:], res["reference"][0][2:], what)
    assert_same("expected_size", "bwd", dtype, res["native"][1], res["reference"][1], what)
