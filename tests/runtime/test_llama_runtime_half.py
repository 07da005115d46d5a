"""The runtime's float32 path for bf16 / fp16 projections on CPUs without native half GEMMs
(``cofi.runtime.llama_runtime.upcast_linear``): the same result as torch's half GEMM, chunked over
the weight's rows, and the runtime's logits agree with and without it."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime import llama_runtime
from cofi.runtime.llama_runtime import LlamaRuntime, needs_upcast, upcast_linear

sys.path.insert(0, os.path.dirname(__file__))
from llama_tiny import V, pair, uniform_masks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_linear_is_the_half_gemm(monkeypatch, dtype):
    monkeypatch.setattr(llama_runtime, "_UPCAST_CHUNK", 7 * 24)  # 7 weight rows a chunk: 5 chunks, a short last one
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 24), (33, 24), (33,)))
    want = (F.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())).to(dtype)
    got = upcast_linear(x.to(dtype), w.to(dtype), b.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 3, 33)
    # float32 accumulation of 24 exact products, one rounding: at most one half ulp from the exact sum
    torch.testing.assert_close(got.double(), want.double(), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                               atol=1e-6)
    torch.testing.assert_close(got, F.linear(x.to(dtype), w.to(dtype), b.to(dtype)), rtol=2 ** -7, atol=1e-2)
    assert upcast_linear(x.to(dtype), w.to(dtype), None).shape == (2, 3, 33)


def test_needs_upcast_only_for_half_on_cpu():
    assert not needs_upcast(torch.float32, torch.device("cpu"))
    assert not needs_upcast(torch.float64, torch.device("cpu"))
    assert needs_upcast(torch.bfloat16, torch.device("cpu")) == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not needs_upcast(torch.bfloat16, torch.device("cuda"))


def test_runtime_bf16_same_with_and_without_upcast():
    _, m = pair("llama", dtype=torch.float32)
    rt = LlamaRuntime(fold_llama(m, uniform_masks(m.shape))).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = LlamaRuntime(fold_llama(m, uniform_masks(m.shape)))(ids).double()
        rt.upcast = True
        up = rt(ids).double()
        rt.upcast = False
        native = rt(ids).double()
    # both are bf16 computations of the float32 model: the same error, not bitwise the same
    e_up, e_native = float((up - ref).norm() / ref.norm()), float((native - ref).norm() / ref.norm())
    assert e_up < 2e-2 and e_native < 2e-2 and abs(e_up - e_native) < 1e-2
