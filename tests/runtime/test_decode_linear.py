"""cofi::decode_linear (the runtime's few-row streaming projection) against a float64 reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cofi  # noqa: F401  (loads cofi._C)
from cofi import _ext
from cofi.ops import last_backend
from cofi.runtime.decode_linear import MAX_ROWS, decode_linear, decode_linear_ref

pytestmark = pytest.mark.skipif(not _ext.has_kernel("decode_linear", "CPU"), reason="cofi._C without decode_linear")
OP = torch.ops.cofi.decode_linear
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    y = OP(x, w, b)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    scale = exact.abs().max().item() if exact.numel() else 1.0
    tol = TOL[x.dtype] * max(scale, 1.0)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (1, 64, 576), (1, 300, 40), (2, 100, 576): whole tiles of multi-row read streams and their rest
@pytest.mark.parametrize("M,N,K", [(1, 37, 13), (1, 64, 576), (1, 300, 40), (2, 9, 33), (2, 100, 576), (3, 100, 47),
                                   (8, 29, 8), (5, 17, 0), (0, 5, 5), (4, 0, 7), (1, 1, 1)])
def test_matches_float64(dtype, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    check(x, w, b)
    check(x, w, None)


def test_float32_equals_reference_rounded_once_and_strided_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 2 * 41, generator=g)[:, ::2]  # non-contiguous weight
    x = torch.randn(41, 3, generator=g).t()  # non-contiguous rows
    torch.testing.assert_close(OP(x, w, None), decode_linear_ref(x, w, None), rtol=1e-6, atol=1e-6)
    xb, wb = x.bfloat16(), w.bfloat16()
    y, ref = OP(xb, wb, None), decode_linear_ref(xb, wb, None)
    assert (y.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


def test_wrapper_reports_backend_and_falls_back_for_many_rows():
    w, b = torch.randn(6, 5), torch.randn(6)
    x = torch.randn(2, 1, 5)
    torch.testing.assert_close(decode_linear(x, w, b), decode_linear_ref(x, w, b), rtol=1e-6, atol=1e-6)
    assert last_backend("decode_linear") == "native"
    many = torch.randn(MAX_ROWS + 1, 5)
    torch.testing.assert_close(decode_linear(many, w, b), decode_linear_ref(many, w, b))
    assert last_backend("decode_linear") == "torch"


@pytest.mark.parametrize("args,match", [
    ((torch.randn(MAX_ROWS + 1, 4), torch.randn(3, 4), None), "at most"),
    ((torch.randn(2, 4), torch.randn(3, 5), None), "share K"),
    ((torch.randn(2, 4), torch.randn(3, 4).bfloat16(), None), "x must have w's dtype"),
    ((torch.randn(2, 4).double(), torch.randn(3, 4).double(), None), "float32, bfloat16 or float16"),
    ((torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), "bias must be"),
    ((torch.randn(4), torch.randn(3, 4), None), r"x must be \[M, K\]"),
])
def test_refuses_bad_input_naming_it(args, match):
    with pytest.raises(RuntimeError, match=match):
        OP(*args)


def test_opcheck():
    x, w, b = torch.randn(3, 19), torch.randn(11, 19), torch.randn(11)
    torch.library.opcheck(OP, (x, w, b), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(OP, (x.bfloat16(), w.bfloat16(), None), test_utils=("test_schema", "test_faketensor"))


@settings(max_examples=40, deadline=None)
@given(M=st.integers(0, MAX_ROWS), N=st.integers(0, 40), K=st.integers(0, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_property_matches_float64(M, N, K, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    check(x, w, torch.randn(N, generator=g).to(dtype) if bias else None)
