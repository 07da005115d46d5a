"""Triton kernels agree with the reference on the inputs where earlier kernels did not.

Hard-concrete: NaN or out-of-range noise gives NaN gates exactly where the reference does (the
kernels' min/max clip used to turn them into 0), u = 0 and u = 1 give 0 and 1 with gradient 0, and
outside the clip the gradient is 0 even for a non-finite upstream gradient. Layer norm: corrected
two-pass statistics, so a row constant over its kept dims normalises to exactly 0 (the one-pass
kernel gave rounding noise times 1 / sqrt(eps)). Run with the GPU launch configurations, under the
interpreter on CPU (see test_triton_gpu_configs.py) or compiled where CUDA is available.
"""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops.reference import hard_concrete_keep_prob_ref, hard_concrete_sample_ref

triton = pytest.importorskip("triton")
configs = pytest.importorskip("cofi_kernels.configs")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64]
NAN, INF = float("nan"), float("inf")
NOISE = [0.5, NAN, 1.5, -0.2, 0.0, 1.0, 1e-6, 1 - 1e-6, -0.0, INF, -INF, 0.3]
T, L, R, EPS = 2.0 / 3.0, -0.1, 1.1, 1e-6


@pytest.fixture(autouse=True)
def gpu_configs():
    with configs.gpu_configs_forced():
        yield


def _sample_and_grad(backend: str, la: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = la.clone().requires_grad_(True)
    z = ops.hard_concrete_sample(leaf, noise=u, backend=backend)
    assert ops.last_backend("hard_concrete_sample") == backend
    (g,) = torch.autograd.grad(z, leaf, torch.ones_like(z))
    return z, g


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_noise_outside_open_interval_matches_reference(dtype):
    la = torch.linspace(-3, 3, len(NOISE), dtype=dtype, device=DEV)
    la[-1] = 0.4  # u = 0.3 with this log_alpha: a gate strictly inside (0, 1), nonzero gradient
    u = torch.tensor(NOISE, dtype=dtype, device=DEV)
    z, g = _sample_and_grad("triton", la, u)
    z_ref, g_ref = _sample_and_grad("reference", la, u)
    torch.testing.assert_close(z, z_ref, equal_nan=True, **tol("hard_concrete", "fwd", dtype))
    assert torch.isnan(z).tolist() == [math.isnan(v) or not 0 <= v <= 1 for v in NOISE]
    assert z[NOISE.index(0.0)] == 0 and z[NOISE.index(1.0)] == 1
    torch.testing.assert_close(g, g_ref, **tol("hard_concrete", "bwd", dtype))
    assert g[:-1].eq(0).all() and g[-1] != 0  # 0 outside the clip, NaN gates included


@pytest.mark.parametrize("dtype", DTYPES)
def test_step_noise_outside_open_interval_matches_reference(dtype):
    la = torch.linspace(-3, 3, len(NOISE), dtype=dtype, device=DEV)
    u = torch.tensor(NOISE, dtype=dtype, device=DEV)
    sizes = dict(num_layers=1, hidden_size=2, num_heads=3, intermediate_size=2)
    res = {}
    for backend in ("triton", "reference"):
        leaf = la.clone().requires_grad_(True)
        r = ops.hard_concrete_step(leaf, {"head": 0, "hidden": 3}, noise=u, backend=backend, **sizes)
        (g,) = torch.autograd.grad(r.z.sum() + r.keep.sum() + r.expected_params, leaf)
        res[backend] = (r.z, g)
    torch.testing.assert_close(res["triton"][0], res["reference"][0], equal_nan=True,
                               **tol("hard_concrete", "fwd", dtype))
    torch.testing.assert_close(res["triton"][1], res["reference"][1], **tol("expected_size", "bwd", dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_non_finite_inputs_match_reference(dtype):
    """Direct kernel calls (no wrapper checks): NaN log_alpha propagates; a NaN upstream gradient
    gives 0 where the reference's where(inside, ., 0) does."""
    import cofi_kernels.hard_concrete as K

    la = torch.tensor([0.0, NAN, 2.0, -INF, INF], dtype=dtype, device=DEV)
    u = torch.full_like(la, 0.3)
    torch.testing.assert_close(K.hard_concrete_sample_fwd_triton(la, u, T, L, R), hard_concrete_sample_ref(la, u, T, L, R),
                               equal_nan=True)
    torch.testing.assert_close(K.hard_concrete_keep_prob_fwd_triton(la, T, L, R, EPS),
                               hard_concrete_keep_prob_ref(la, T, L, R, EPS), equal_nan=True)
    g = torch.ones_like(la)
    assert torch.isfinite(K.hard_concrete_sample_bwd_triton(g, la, u, T, L, R)).all()
    assert torch.isfinite(K.hard_concrete_keep_prob_bwd_triton(g, la, T, L, R, EPS)).all()

    la = torch.linspace(-3, 3, len(NOISE), dtype=dtype, device=DEV)
    la[-1] = 0.4
    u = torch.tensor(NOISE, dtype=dtype, device=DEV)
    g = torch.full_like(la, NAN)
    gz = K.hard_concrete_sample_bwd_triton(g, la, u, T, L, R)
    assert gz[:-1].eq(0).all() and gz[-1].isnan()  # only the last gate (u = 0.3) is inside the clip
    big = torch.tensor([-40.0, 0.0, 40.0], dtype=dtype, device=DEV)  # keep prob clamped, inside, clamped
    gk = K.hard_concrete_keep_prob_bwd_triton(torch.full_like(big, NAN), big, T, L, R, EPS)
    assert gk[0] == 0 and gk[1].isnan() and gk[2] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.1, 1.7, 123.4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_constant_row_normalises_to_zero(dtype, value, masked, residual):
    d = 768
    x = torch.full((3, d), value, dtype=dtype, device=DEV)
    w = torch.ones(d, dtype=dtype, device=DEV)
    b = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=dtype).to(DEV)
    z = torch.ones(d, dtype=dtype, device=DEV)
    if masked:
        z[::3] = 0.0
        x[:, ::3] = -5.0  # pruned dims do not count: the kept dims are still constant
    r = None
    if residual:  # v = x z + r: value + 0.75 on the kept dims, anything on the pruned ones
        r = torch.full_like(x, 0.75)
        if masked:
            r[:, ::3] = torch.randn(3, d // 3, generator=torch.Generator().manual_seed(1), dtype=dtype).to(DEV)
    y = ops.masked_layer_norm(x, r, w, b, z if masked else None, backend="triton")
    assert ops.last_backend("masked_layer_norm") == "triton"
    want = ops.masked_layer_norm(x, r, w, b, z if masked else None, backend="reference")
    torch.testing.assert_close(y, (b * z).expand(3, d), atol=1e-6, rtol=0)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_constant_rows_match_reference_fwd_bwd(dtype):
    """Every other row constant (rstd = 1 / sqrt(eps) there), forward and backward against the reference."""
    N, d = 2 * configs.LAYER_NORM_ROWS + 3, 200
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    x[::2] = 7.1
    w, b = torch.randn(d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    z = torch.ones(d, dtype=dtype)  # 0 / 1 gates: x z is constant over the kept dims of a constant x row
    z[::4] = 0.0
    gy = torch.randn(N, d, generator=g, dtype=dtype)
    res = {}
    for backend in ("triton", "reference"):
        ins = [t.to(DEV).requires_grad_(True) for t in (x, w, b, z)]
        y = ops.masked_layer_norm(ins[0], None, *ins[1:], eps=1e-5, backend=backend)
        res[backend] = (y, *torch.autograd.grad(y, ins, gy.to(DEV)))
    torch.testing.assert_close(res["triton"][0], res["reference"][0], **tol("masked_layer_norm", "fwd", dtype))
    assert res["triton"][0][::2].eq((b * z).to(DEV)).all()
    for a, b_ in zip(res["triton"][1:], res["reference"][1:]):
        torch.testing.assert_close(a, b_, **tol("masked_layer_norm", "bwd", dtype))
