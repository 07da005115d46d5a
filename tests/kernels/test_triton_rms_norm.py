"""masked_rms_norm's Triton kernels executed with their GPU launch configuration (forced once through
COFI_TRITON_GPU_CONFIGS=1, as a GPU run would pick them), compared with the reference; and the
bfloat16 launcher (fp32 statistics; no tl.dot, so the interpreter is exact)."""
from __future__ import annotations

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops.reference import masked_add_rms_norm_ref, masked_rms_norm_ref

triton = pytest.importorskip("triton")
configs = pytest.importorskip("cofi_kernels.configs")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="interpreter test (GPU runs use these configs anyway)")

OP = "masked_rms_norm"


def _leaves(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_gpu_configs_vs_reference(dtype, monkeypatch):
    monkeypatch.setattr(configs, "force_gpu", None)
    monkeypatch.setenv(configs.GPU_CONFIGS_ENV, "1")
    assert configs.use_gpu_configs(torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    N, d = 2 * configs.LAYER_NORM_ROWS + 3, 200  # three backward programs, a ragged one; d padded to 256
    x, r = (torch.randn(N, d, generator=g, dtype=dtype) for _ in range(2))
    w = torch.randn(d, generator=g, dtype=dtype)
    z = torch.rand(d, generator=g, dtype=dtype)
    z[::4] = 0.0
    ins, ref_ins = _leaves(x, r, w, z), _leaves(x, r, w, z)
    y, s = ops.masked_add_rms_norm(*ins, eps=1e-5, backend="triton")
    assert ops.last_backend(OP) == "triton"
    y_ref, s_ref = masked_add_rms_norm_ref(*ref_ins, eps=1e-5)
    torch.testing.assert_close(y, y_ref, **tol(OP, "fwd", dtype))
    torch.testing.assert_close(s, s_ref, **tol(OP, "fwd", dtype))
    gy, gs = (torch.randn(N, d, generator=g, dtype=dtype) for _ in range(2))
    for a, b in zip(torch.autograd.grad((y, s), ins, (gy, gs)), torch.autograd.grad((y_ref, s_ref), ref_ins, (gy, gs))):
        torch.testing.assert_close(a, b, **tol(OP, "bwd", dtype))


def test_rms_norm_bf16_launcher():
    import cofi_kernels.masked_rms_norm as K

    g = torch.Generator().manual_seed(3)
    N, d = 11, 96
    x, r = (torch.randn(N, d, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(d, generator=g).bfloat16()
    z = (torch.rand(d, generator=g) > 0.2).bfloat16()
    y, s, rstd = K.masked_rms_norm_fwd_triton(x, r, w, z, 1e-5, True)
    assert rstd.dtype == torch.float32 and s.dtype == torch.bfloat16
    # s is the fp32 sum stored once in bfloat16: within one bf16 ulp (the interpreter truncates where
    # a GPU rounds to nearest)
    torch.testing.assert_close(s.float(), x.float() * z.float() + r.float(), atol=0, rtol=2.0 ** -7)
    want = masked_rms_norm_ref(s.float(), None, w.float(), z.float(), 1e-5)
    torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=1e-2)
