"""Every Triton kernel executed with its GPU launch configuration, compared with the reference ops.

On CPU the launchers use small interpreter tiles; here ``gpu_configs_forced()`` makes them use
the tiles a GPU runs (cofi_kernels/configs.py), on small shapes that still span several tiles,
padding and dead heads / units. float32 and float64 through the public ops; bfloat16 only where
no ``tl.dot`` is involved (the Triton 3.9 interpreter multiplies bfloat16 dot operands as raw
integers).
"""
from __future__ import annotations

import math

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops.masked_attention import masked_attention
from cofi.ops.reference import (
    expected_size_ref,
    hard_concrete_deterministic_ref,
    hard_concrete_keep_prob_ref,
    hard_concrete_sample_ref,
    masked_ffn_ref,
    masked_layer_norm_ref,
)
from cofi.ops.reference.masked_attention import dropout_seed, masked_attention_core_ref

triton = pytest.importorskip("triton")
configs = pytest.importorskip("cofi_kernels.configs")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="interpreter test (GPU runs use these configs anyway)")

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def gpu_configs():
    with configs.gpu_configs_forced():
        yield


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad(out, inputs, g, allow_unused=True))


def _leaves(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


# ============================== masked_attention ================================================

# (dtype, S, D): D picks the tile (block_d 64 or 256); S spans two query and key tiles with padding.
ATTN_CASES = [(torch.float32, 70, 40), (torch.float64, 40, 40), (torch.float32, 40, 200)]


@pytest.mark.parametrize("dtype,S,D", ATTN_CASES, ids=[f"{str(c[0])[6:]}-S{c[1]}-D{c[2]}" for c in ATTN_CASES])
def test_attention_gpu_tiles_vs_reference(dtype, S, D):
    cfg = configs.attention_config(dtype, D, gpu=True)
    assert cfg.block_d >= D and all(S > max(t.block_m, t.block_n) for t in (cfg.fwd, cfg.dkdv, cfg.dq))
    g = torch.Generator().manual_seed(0)
    Bsz, H = 2, 3
    q, k, v = (torch.randn(Bsz, H, S, D, generator=g, dtype=dtype) for _ in range(3))
    z = torch.tensor([0.7, 0.0, 1.3], dtype=dtype)
    mask = torch.rand(Bsz, S, generator=g) > 0.25
    mask[:, 0] = True
    scale, p = 1.0 / math.sqrt(D), 0.2
    seed = dropout_seed(torch.Generator().manual_seed(5), q.device)

    ins = _leaves(q, k, v, z)
    out, lse = torch.ops.cofi.masked_attention(*ins, mask, scale, p, seed, "triton")
    assert ops.last_backend("masked_attention") == "triton"
    ref_ins = _leaves(q, k, v, z)
    ref, ref_lse = masked_attention_core_ref(*ref_ins, mask, scale, p, seed)
    torch.testing.assert_close(out, ref, **tol("masked_attention", "fwd", dtype))
    torch.testing.assert_close(lse, ref_lse, **tol("masked_attention", "fwd", dtype))
    for a, b in zip(_grads(out, ins), _grads(ref, ref_ins)):
        torch.testing.assert_close(a, b, **tol("masked_attention", "bwd", dtype))


def test_attention_grid_is_one_dimensional(monkeypatch):
    """Batch x heads must not sit on grid y/z (capped at 65,535 on CUDA): all launches are 1-D."""
    import cofi_kernels.masked_attention as K

    grids: list[tuple[int, ...]] = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return self.kernel[grid]

    for name in ("_masked_attention_fwd_kernel", "_masked_attention_bwd_kernel", "_masked_attention_bwd_dq_kernel"):
        monkeypatch.setattr(K, name, Spy(getattr(K, name)))
    Bsz, H, S, D = 3, 2, 20, 16
    q = torch.randn(Bsz, H, S, D, requires_grad=True)
    masked_attention(q, q, q, backend="triton").sum().backward()
    cfg = configs.attention_config(q.dtype, D, gpu=True)
    blocks = [math.ceil(S / cfg.fwd.block_m), math.ceil(S / cfg.dkdv.block_n), math.ceil(S / cfg.dq.block_m)]
    assert grids == [(n * Bsz * H,) for n in blocks]


def test_attention_smem_check_refuses_unfitting_tiles(monkeypatch):
    """A tile whose estimate exceeds the device's shared memory is refused; auto then skips Triton."""
    q = torch.zeros(1, 1, 4, 256)
    assert configs.attention_reasons(q) == []
    monkeypatch.setitem(configs.ATTENTION_GPU, ("fp32", 256), (configs.Tile(128, 128, 8, 3),) * 3)
    why = configs.attention_reasons(q)
    assert why and "shared memory" in why[0]
    with pytest.raises(ops.BackendError, match="shared memory"):
        masked_attention(q, q, q, backend="triton")
    monkeypatch.undo()
    for (cls, bd), tiles in configs.ATTENTION_GPU.items():
        dt = {"fp32": torch.float32, "half": torch.bfloat16, "fp64": torch.float64}[cls]
        est = configs.attention_smem_bytes(dt, configs.AttentionConfig(bd, *tiles))
        assert max(est.values()) <= configs.SMEM_LIMIT_SM90, (cls, bd, est)


# ============================== masked_ffn ======================================================

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_ffn_gpu_tiles_vs_reference(dtype, activation):
    g = torch.Generator().manual_seed(1)
    c = configs.FFN_GEMM
    N, d, F = c.block_m + 7, c.block_k + 9, 2 * c.block_n + 5  # every GEMM dim spans two tiles
    x = torch.randn(N, d, generator=g, dtype=dtype)
    w1, b1 = torch.randn(F, d, generator=g, dtype=dtype) / d ** 0.5, torch.randn(F, generator=g, dtype=dtype)
    w2, b2 = torch.randn(d, F, generator=g, dtype=dtype) / F ** 0.5, torch.randn(d, generator=g, dtype=dtype)
    int_z = torch.rand(F, generator=g, dtype=dtype)
    int_z[::3] = 0.0
    mlp_z = torch.tensor(0.8, dtype=dtype)
    ins = _leaves(x, w1, b1, w2, b2, int_z, mlp_z)
    ref_ins = _leaves(x, w1, b1, w2, b2, int_z, mlp_z)
    y = ops.masked_ffn(*ins, activation=activation, backend="triton")
    assert ops.last_backend("masked_ffn") == "triton"
    y_ref = masked_ffn_ref(*ref_ins, activation=activation)
    torch.testing.assert_close(y, y_ref, **tol("masked_ffn", "fwd", dtype))
    for a, b in zip(_grads(y, ins), _grads(y_ref, ref_ins)):
        torch.testing.assert_close(a, b, **tol("masked_ffn", "bwd", dtype))


# ============================== masked_layer_norm ===============================================

@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_gpu_tiles_vs_reference(dtype):
    g = torch.Generator().manual_seed(2)
    N, d = 2 * configs.LAYER_NORM_ROWS + 3, 200
    x, r = (torch.randn(N, d, generator=g, dtype=dtype) for _ in range(2))
    w, b = torch.randn(d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    z = torch.rand(d, generator=g, dtype=dtype)
    z[::4] = 0.0
    ins = _leaves(x, r, w, b, z)
    ref_ins = _leaves(x, r, w, b, z)
    y = ops.masked_layer_norm(*ins, eps=1e-5, backend="triton")
    assert ops.last_backend("masked_layer_norm") == "triton"
    y_ref = masked_layer_norm_ref(*ref_ins, eps=1e-5)
    torch.testing.assert_close(y, y_ref, **tol("masked_layer_norm", "fwd", dtype))
    for a, b_ in zip(_grads(y, ins), _grads(y_ref, ref_ins)):
        torch.testing.assert_close(a, b_, **tol("masked_layer_norm", "bwd", dtype))


def test_layer_norm_bf16_launcher():
    """bfloat16 storage, fp32 statistics (the GPU dtype; no tl.dot, so the interpreter is exact)."""
    import cofi_kernels.masked_layer_norm as K

    g = torch.Generator().manual_seed(3)
    N, d = 11, 96
    x, r = (torch.randn(N, d, generator=g).bfloat16() for _ in range(2))
    w, b = torch.randn(d, generator=g).bfloat16(), torch.randn(d, generator=g).bfloat16()
    z = (torch.rand(d, generator=g) > 0.2).bfloat16()
    y, mean, rstd = K.masked_layer_norm_fwd_triton(x, r, w, b, z, 1e-5)
    assert mean.dtype == torch.float32
    want = masked_layer_norm_ref(x.float(), r.float(), w.float(), b.float(), z.float(), 1e-5)
    torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=1e-2)


# ============================== hard-concrete family ============================================

@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_concrete_kernels_vs_reference(dtype):
    from cofi_kernels.hard_concrete import BLOCK

    g = torch.Generator().manual_seed(4)
    la = torch.randn(BLOCK + 300, generator=g, dtype=dtype) * 3  # two programs, a ragged tail
    u = torch.rand(la.shape, generator=g, dtype=dtype).clamp(1e-6, 1 - 1e-6)
    t = tol("hard_concrete", "fwd", dtype)

    ins, ref_ins = _leaves(la), _leaves(la)
    z = ops.hard_concrete_sample(ins[0], noise=u, backend="triton")
    z_ref = hard_concrete_sample_ref(ref_ins[0], u)
    torch.testing.assert_close(z, z_ref, **t)
    torch.testing.assert_close(_grads(z, ins)[0], _grads(z_ref, ref_ins)[0], **tol("hard_concrete", "bwd", dtype))

    ins, ref_ins = _leaves(la), _leaves(la)
    p = ops.hard_concrete_keep_prob(ins[0], backend="triton")
    p_ref = hard_concrete_keep_prob_ref(ref_ins[0])
    torch.testing.assert_close(p, p_ref, **t)
    torch.testing.assert_close(_grads(p, ins)[0], _grads(p_ref, ref_ins)[0], **tol("hard_concrete", "bwd", dtype))

    rows = la[: 3 * 150].reshape(3, 150)  # rank kernel: three column tiles of 64; rowsum: two of 128
    for mode in ("soft", "binary"):
        torch.testing.assert_close(ops.hard_concrete_deterministic(rows, mode, backend="triton"),
                                   hard_concrete_deterministic_ref(rows, mode), **t)

    L, d, H, F = 2, 300, 4, 600  # rowsum BLOCK 256 over d and F: two tiles each
    groups = dict(hidden=torch.rand(d, generator=g, dtype=dtype), head=torch.rand(L, H, generator=g, dtype=dtype),
                  mha=torch.rand(L, generator=g, dtype=dtype), intermediate=torch.rand(L, F, generator=g, dtype=dtype),
                  ffn=torch.rand(L, generator=g, dtype=dtype))
    sizes = dict(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F)
    ins = dict(zip(groups, _leaves(*groups.values())))
    ref_ins = dict(zip(groups, _leaves(*groups.values())))
    e, s = ops.expected_size(**sizes, **ins, backend="triton")
    e_ref, s_ref = expected_size_ref(ref_ins["hidden"], ref_ins["head"], ref_ins["mha"], ref_ins["intermediate"],
                                     ref_ins["ffn"], L, d, H, F)
    te = tol("expected_size", "fwd", dtype)
    torch.testing.assert_close(e, e_ref, **te)
    torch.testing.assert_close(s, s_ref, **te)
    for a, b in zip(torch.autograd.grad(e + 1000 * s, list(ins.values())),
                    torch.autograd.grad(e_ref + 1000 * s_ref, list(ref_ins.values()))):
        torch.testing.assert_close(a, b, **tol("expected_size", "bwd", dtype))


# ============================== switches ========================================================

def test_gpu_config_switch(monkeypatch):
    cpu = torch.device("cpu")
    assert configs.use_gpu_configs(cpu)  # the autouse fixture
    with configs.gpu_configs_forced(False):
        assert not configs.use_gpu_configs(cpu)
        assert configs.attention_config(torch.float32, 64, gpu=False).fwd.block_m == configs.ATTENTION_INTERPRET_BLOCK
    monkeypatch.setattr(configs, "force_gpu", None)
    monkeypatch.delenv(configs.GPU_CONFIGS_ENV, raising=False)
    assert not configs.use_gpu_configs(cpu)
    monkeypatch.setenv(configs.GPU_CONFIGS_ENV, "1")
    assert configs.use_gpu_configs(cpu)
    x = torch.ones(3)
    with configs.device_guard(x):  # no CUDA context on CPU tensors
        pass
    assert configs.on_tensor_device(lambda t, k=2: t * k)(x, k=3).tolist() == [3.0, 3.0, 3.0]
