"""Launch configurations of the Triton kernels, their shared-memory estimates, and the device guard.

GPU configurations are what the launchers use on CUDA tensors. Under ``TRITON_INTERPRET=1`` they
use small interpreter blocks unless the GPU configurations are forced (``COFI_TRITON_GPU_CONFIGS=1``
or ``gpu_configs_forced()``), which lets CPU tests execute the exact tile shapes a GPU runs.
``tools/triton_aot_check.py`` compiles every GPU configuration listed here for sm_90.

This module does not import triton: the ops' backend checks read it before every call.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

SMEM_LIMIT_SM90 = 232_448  # H100 / H200: 227 KB opt-in shared memory per block
GPU_CONFIGS_ENV = "COFI_TRITON_GPU_CONFIGS"
ATTENTION_MAX_HEAD_DIM = 256

# None: decided by the device and GPU_CONFIGS_ENV; True / False: forced (tests).
force_gpu: bool | None = None


def use_gpu_configs(device: torch.device) -> bool:
    """Whether launches on ``device`` use the GPU configurations."""
    if force_gpu is not None:
        return force_gpu
    return device.type == "cuda" or os.environ.get(GPU_CONFIGS_ENV) == "1"


@contextlib.contextmanager
def gpu_configs_forced(on: bool = True) -> Iterator[None]:
    """Use (or avoid) the GPU configurations on every device inside the block."""
    global force_gpu
    prev, force_gpu = force_gpu, on
    try:
        yield
    finally:
        force_gpu = prev


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current device for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` under ``device_guard`` of its first CUDA tensor argument (if any)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        t = next((a for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)
        if t is None:
            return fn(*args, **kwargs)
        with device_guard(t):
            return fn(*args, **kwargs)

    return wrapper


def smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block of ``device``; the sm_90 limit off-GPU (forced GPU configs)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT_SM90))
    return SMEM_LIMIT_SM90


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "fp64" if dtype == torch.float64 else "fp32"


# ============================== masked_attention =================================================

@dataclass(frozen=True)
class Tile:
    """One kernel's tile: block_m query rows x block_n key rows, and its launch options."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfig:
    """Tiles of the three attention kernels (forward, backward dK/dV, backward dQ) for head dims
    padded to block_d. The backward kernels hold one block (keys for dK/dV, queries for dQ) and
    loop over the other; they are separate launches, so their tiles are independent."""

    block_d: int
    fwd: Tile
    dkdv: Tile
    dq: Tile


def _t(bm: int, bn: int, warps: int, stages: int) -> Tile:
    return Tile(bm, bn, warps, stages)


# (dtype class, block_d) -> (fwd, dkdv, dq) tiles, chosen spill-free on sm_90 for the heaviest variant
# (padding mask, head gates, dropout and causal all on) by
# tools/triton_aot_check.py (ptxas of Triton 3.9). fp32 runs ieee FMA dots (no tensor cores): the
# dK/dV kernel needs one stage and narrow tiles (with more, ptxas falls back to 32 registers and
# spills kilobytes).
ATTENTION_GPU: dict[tuple[str, int], tuple[Tile, Tile, Tile]] = {
    ("half", 16): (_t(64, 64, 4, 3), _t(64, 64, 4, 3), _t(64, 64, 4, 3)),
    ("half", 32): (_t(64, 64, 4, 3), _t(32, 64, 4, 3), _t(64, 64, 4, 3)),
    ("half", 64): (_t(64, 64, 8, 3), _t(32, 64, 8, 3), _t(64, 32, 8, 3)),
    ("half", 128): (_t(64, 64, 8, 3), _t(32, 64, 8, 3), _t(32, 16, 8, 3)),
    ("half", 256): (_t(32, 32, 8, 2), _t(16, 32, 8, 2), _t(32, 16, 8, 2)),
    ("fp32", 16): (_t(32, 64, 8, 3), _t(32, 32, 4, 3), _t(32, 32, 4, 3)),
    ("fp32", 32): (_t(64, 64, 8, 3), _t(32, 32, 8, 3), _t(32, 32, 8, 3)),
    ("fp32", 64): (_t(32, 64, 8, 3), _t(32, 32, 8, 1), _t(32, 32, 4, 3)),
    ("fp32", 128): (_t(16, 32, 4, 2), _t(16, 32, 8, 1), _t(32, 32, 8, 2)),
    ("fp32", 256): (_t(32, 32, 8, 2), _t(16, 32, 8, 1), _t(16, 32, 8, 2)),
    # float64 is a CPU-only Triton dtype: these exist for the forced-GPU-config interpreter tests.
    ("fp64", 16): (_t(32, 32, 8, 2),) * 3,
    ("fp64", 32): (_t(32, 32, 8, 2),) * 3,
    ("fp64", 64): (_t(32, 32, 8, 2),) * 3,
    ("fp64", 128): (_t(32, 32, 8, 2),) * 3,
    ("fp64", 256): (_t(16, 16, 8, 2),) * 3,
}
ATTENTION_INTERPRET_BLOCK = 16


def attention_block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def attention_config(dtype: torch.dtype, head_dim: int, gpu: bool) -> AttentionConfig:
    """Tiles for q of ``dtype`` and ``head_dim`` (<= ATTENTION_MAX_HEAD_DIM)."""
    bd = attention_block_d(head_dim)
    if not gpu:
        t = _t(ATTENTION_INTERPRET_BLOCK, ATTENTION_INTERPRET_BLOCK, 4, 1)
        return AttentionConfig(bd, t, t, t)
    return AttentionConfig(bd, *ATTENTION_GPU[(_dtype_class(dtype), bd)])


def attention_smem_bytes(dtype: torch.dtype, cfg: AttentionConfig) -> dict[str, int]:
    """Upper estimate of each attention kernel's shared memory, keyed fwd / dkdv / dq.

    Triton stages a loop's tile loads in shared memory (num_stages - 1 buffers, at least one) and
    passes dot operands through it. e: element size of q, k, v and dO (probabilities are cast to it
    before a dot); the per-row statistics and the padding mask are 4-byte. An upper bound of what
    Triton 3.9 allocates for every shipped tile (tools/triton_aot_check.py checks it), tight for
    the fp32 forward and dQ kernels, up to 2.5x high for half precision.
    """
    e = dtype.itemsize
    d = cfg.block_d

    def stages(t: Tile) -> int:
        return max(t.num_stages - 1, 1)

    m, n = cfg.fwd.block_m, cfg.fwd.block_n
    fwd = stages(cfg.fwd) * (2 * n * d * e + 4 * n) + m * d * e + m * n * e
    m, n = cfg.dkdv.block_m, cfg.dkdv.block_n
    dkdv = stages(cfg.dkdv) * (2 * m * d * e + 2 * 4 * m) + 2 * n * d * e + m * d * e + 2 * m * n * e
    m, n = cfg.dq.block_m, cfg.dq.block_n
    dq = stages(cfg.dq) * (2 * n * d * e + 4 * n) + 2 * m * d * e + m * n * e
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def attention_reasons(q: torch.Tensor) -> list[str]:
    """Why the Triton attention kernels cannot run ``q`` [B, H, S, D] (empty = they can)."""
    D = q.shape[-1]
    if D > ATTENTION_MAX_HEAD_DIM:
        return [f"head dim {D} > {ATTENTION_MAX_HEAD_DIM} not supported by the Triton kernel"]
    if not use_gpu_configs(q.device):
        return []
    cfg = attention_config(q.dtype, D, gpu=True)
    need = max(attention_smem_bytes(q.dtype, cfg).values())
    limit = smem_limit(q.device)
    if need > limit:
        return [f"Triton attention tiles for head dim {cfg.block_d} ({str(q.dtype).replace('torch.', '')}) need "
                f"~{need} B shared memory > {limit} B on this device"]
    return []


# ============================== masked_ffn ======================================================

@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One tile for GPU and interpreter (num_warps / num_stages are ignored by the interpreter).
FFN_GEMM = GemmConfig(32, 32, 32, 4, 3)


# ============================== masked_layer_norm ===============================================

LAYER_NORM_ROWS = 8  # rows per backward program (partial column sums per program)


def layer_norm_num_warps(block_d: int, dtype: torch.dtype) -> int:
    """Warps for rows of ``block_d`` columns: 4 up to 1024 fp32 columns, 8 beyond (with 16 the
    register cap of 128 per thread makes the backward spill). The backward keeps about a dozen row
    vectors live, so it spills from 4096 columns (2048 in float64) on: a few bytes at 4096, more beyond."""
    stat_bytes = 8 if dtype == torch.float64 else 4
    return min(8, max(4, block_d * stat_bytes // 1024))
