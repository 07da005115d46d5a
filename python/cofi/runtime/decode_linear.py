"""``decode_linear``: ``x w^T + b`` for the few rows of an incremental decoding step, through the
native CPU kernel ``cofi::decode_linear`` (csrc/decode_linear/decode_linear_cpu.cpp) where it can run,
else the plain-PyTorch reference. Inference only (no autograd kernel).

A decode step's projections are matrix-vector products over weights that do not fit in cache; the
kernel streams each weight once at close to the machine's read bandwidth (short rows grouped into
3-4 KiB read streams; docs/decoder-runtime.md); ratios to torch's ``F.linear`` in
benchmarks/README.md (benchmarks/bench_decode_linear.py, this 2-core AVX2 machine). Products and sums are float32 for every
weight dtype (float32, bfloat16, float16), the result is rounded once to x's dtype: the same operation
as ``decode_linear_ref``. ``cofi.ops.last_backend("decode_linear")`` says which ran.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import _ext
from ..ops import _backends as B

OP = "decode_linear"
MAX_ROWS = 8  # the kernel's limit (kMaxRows): beyond it a GEMM reuses each weight well enough
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake("cofi::decode_linear")
def _fake(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1])
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.register_fake("cofi::llama_decode_step")
def _fake_step(r, params, dims, cos, sin, k_cache, v_cache, start, mask, head_dim, eps, norm=None,
               lm_head=None) -> torch.Tensor:
    return torch.empty_like(r) if lm_head is None else r.new_empty(r.shape[0], lm_head.shape[0])


def decode_linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The reference: ``F.linear`` in float32, rounded once to x's dtype. x: [..., K]; w: [N, K];
    b: [N] | None. Returns [..., N]."""
    y = F.linear(x.float(), w.float(), None if b is None else b.float())
    return y.to(x.dtype)


@functools.lru_cache(maxsize=8)
def _native(dtype: torch.dtype) -> bool:
    return dtype in DTYPES and _ext.has_kernel(OP, "CPU")


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when the native kernel runs ``x @ w^T`` exactly as the reference would: CPU, at most
    MAX_ROWS rows, matching float dtypes, no gradient, not being traced."""
    return (x.device.type == "cpu" and x.dtype == w.dtype and _native(x.dtype) and x.numel() <= MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.compiler.is_compiling())


def native_step(rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """True when ``cofi::llama_decode_step`` (same kernels, a whole step in one call) can run a decoding
    step of ``rows`` new tokens: CPU, rows <= MAX_ROWS, a supported dtype, not being traced."""
    return (device.type == "cpu" and rows <= MAX_ROWS and _native(dtype)
            and _ext.has_kernel("llama_decode_step", "CPU") and not torch.compiler.is_compiling())


def native_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The native kernel on inputs ``usable`` accepted (not checked again). x: [..., K]; w: [N, K];
    b: [N] | None. Returns [..., N]."""
    y = torch.ops.cofi.decode_linear(x.reshape(-1, x.shape[-1]), w, b)
    B.record(OP, "native", x.device)
    return y.view(*x.shape[:-1], w.shape[0])


def decode_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x w^T + b`` computed in float32, rounded once to x's dtype. x: [..., K] with at most
    MAX_ROWS rows for the native kernel (more rows: the reference); w: [N, K]; b: [N] | None.
    Returns [..., N]."""
    if usable(x, w):
        return native_linear(x, w, b)
    B.record(OP, "torch", x.device)
    return decode_linear_ref(x, w, b)


__all__ = ["MAX_ROWS", "decode_linear", "decode_linear_ref", "native_linear", "native_step", "usable"]
