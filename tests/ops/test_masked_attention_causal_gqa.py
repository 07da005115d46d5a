"""masked_attention with causal masking and grouped-query K/V: every backend vs the reference (float64),
the reference vs a transformers-style computation, gradients, opcheck, bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from cofi.errors import UserError
from cofi.ops import _backends as B
from cofi.ops.masked_attention import cuda_kernel_reasons, masked_attention
from cofi.ops.reference.masked_attention import masked_attention_core_ref, masked_attention_ref

OP = "masked_attention"


def _available() -> list[str]:
    q = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    return [n for n, impl in B._REGISTRY[OP].impls.items() if not impl.reasons(q)]


BACKENDS = _available()  # reference, native (if built), triton (interpreted), sdpa


def _case(Bsz, H, Hkv, S, D, gate, pad, strided, seed=0):
    """Fresh random (q [B, H, S, D], k, v [B, Hkv, S, D], head_z, kv_z, mask) in float64."""
    g = torch.Generator().manual_seed(seed)
    if strided:  # k, v as views of a [B, S, Hkv, D] projection output, q of a wider buffer
        q = torch.randn(Bsz, S, H, D + 3, generator=g, dtype=torch.float64)[..., :D].transpose(1, 2)
        k, v = (torch.randn(Bsz, S, Hkv, D, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(Bsz, H, S, D, generator=g, dtype=torch.float64)
        k, v = (torch.randn(Bsz, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    head_z = kv_z = None
    if gate in ("heads", "both") and H:
        head_z = torch.rand(H, generator=g, dtype=torch.float64) + 0.1
        head_z[0] = 0.0
    if gate in ("groups", "both") and Hkv:
        kv_z = torch.rand(Hkv, generator=g, dtype=torch.float64) + 0.1
        kv_z[-1] = 0.0  # a dead group
    mask = None
    if pad:
        mask = torch.rand(Bsz, S, generator=g) > 0.3
        mask[0, 0] = False  # causal: row 0 of batch 0 sees no key
        if Bsz > 1:
            mask[-1] = False  # a fully padded batch row
    return q, k, v, head_z, kv_z, mask


CASES = [  # (B, H, Hkv, S, D, gate, pad, strided)
    (2, 4, 2, 9, 8, "heads", False, False),
    (2, 6, 2, 11, 5, "both", True, True),
    (1, 3, 1, 7, 4, "groups", True, False),
    (2, 4, 4, 10, 6, "both", True, True),  # multi-head (G = 1)
    (3, 2, 1, 1, 3, "none", False, True),  # S = 1
    (2, 0, 0, 5, 4, "none", False, False),  # no heads
    (2, 2, 1, 0, 4, "heads", False, False),  # empty sequence
    (1, 4, 2, 70, 8, "none", True, False),  # more than one 64-row query block
]
IDS = ["gqa", "gqa_pad_strided", "mqa_pad", "mha_pad_strided", "S1", "H0", "S0", "blocks"]


def _reference(q, k, v, head_z, kv_z, mask, causal):
    """The reference with the combined gate (head_z[h] * kv_z[h // G]), as masked_attention forms it."""
    z = head_z
    if kv_z is not None:
        zg = kv_z.repeat_interleave(q.shape[1] // k.shape[1])
        z = zg if z is None else z * zg
    return masked_attention_ref(q, k, v, z, mask, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_vs_reference_float64(backend, case, causal):
    q, k, v, head_z, kv_z, mask = _case(*case)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    zs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (head_z, kv_z)]
    out = masked_attention(*leaves, zs[0], mask, causal=causal, kv_z=zs[1], backend=backend)
    assert B.last_backend(OP) == backend
    rl = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    rz = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (head_z, kv_z)]
    ref = _reference(*rl, *rz, mask, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()
    if out.numel() == 0:
        return
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves + zs, rl + rz):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)
    if head_z is not None:  # dead heads: zero gradient for every input of theirs
        assert zs[0].grad[0] == 0
    if kv_z is not None:
        assert zs[1].grad[-1] == 0
        G = q.shape[1] // k.shape[1]
        assert (out[:, -G:] == 0).all()
        if backend != "sdpa" or head_z is None:
            assert (leaves[1].grad[:, -1] == 0).all() and (leaves[2].grad[:, -1] == 0).all()


def _transformers_style(q, k, v, mask, causal):
    """Llama's eager attention: repeat_kv, additive causal / padding mask, softmax, matmul."""
    Bsz, H, S, D = q.shape
    G = H // k.shape[1]

    def repeat_kv(x):  # transformers.models.llama.modeling_llama.repeat_kv
        b, hkv, s, d = x.shape
        return x[:, :, None].expand(b, hkv, G, s, d).reshape(b, hkv * G, s, d)

    kk, vv = repeat_kv(k), repeat_kv(v)
    w = q @ kk.transpose(2, 3) / math.sqrt(D)
    bias = torch.zeros(Bsz, 1, S, S, dtype=q.dtype)
    if causal:
        bias = bias.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(w + bias, dim=-1)
    return torch.nan_to_num(p, nan=0.0) @ vv  # rows with no visible key: 0, as cofi defines them


@pytest.mark.parametrize("pad", [False, True])
def test_reference_matches_transformers_style(pad):
    q, k, v, _, _, mask = _case(2, 9, 3, 12, 8, "none", pad, False, seed=3)
    torch.testing.assert_close(masked_attention_ref(q, k, v, None, mask if pad else None, causal=True),
                               _transformers_style(q, k, v, mask if pad else None, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
def test_gradcheck(backend):
    q, k, v, head_z, kv_z, mask = _case(1, 4, 2, 6, 3, "both", True, True, seed=4)
    head_z, kv_z = head_z + 0.3, kv_z + 0.3  # a gate at exactly 0 has zero gradient by definition
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v, head_z, kv_z)]

    def f(q, k, v, hz, kz):
        return masked_attention(q, k, v, hz, mask, causal=True, kv_z=kz, backend=backend)

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
def test_opcheck(backend):
    q, k, v, head_z, _, mask = _case(2, 4, 2, 5, 4, "heads", True, True, seed=6)
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v, head_z)]
    torch.library.opcheck(torch.ops.cofi.masked_attention.default,
                          (*ins, mask, 0.5, 0.0, None, backend, True))


def test_dropout_with_causal_gqa_matches_reference():
    q, k, v, head_z, _, mask = _case(2, 4, 2, 9, 8, "heads", True, False, seed=7)
    seed = torch.tensor([11, 12], dtype=torch.int64)
    ref, ref_lse = masked_attention_core_ref(q, k, v, head_z, mask, 0.3, 0.25, seed, True)
    for backend in [b for b in BACKENDS if b not in ("reference", "sdpa")]:
        out, lse = torch.ops.cofi.masked_attention(q, k, v, head_z, mask, 0.3, 0.25, seed, backend, True)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_cuda_native_refuses_causal_and_gqa():
    q = torch.zeros(1, 4, 3, 8)
    k = torch.zeros(1, 2, 3, 8)
    fwd = cuda_kernel_reasons(q, k, k, None, None, 1.0, 0.0, None, True)
    assert any("causal=True" in r for r in fwd) and any("fewer heads" in r for r in fwd)
    bwd = cuda_kernel_reasons(q, q, k, k, None, None, q, q[..., 0], 1.0, 0.0, None, False)
    assert len(bwd) == 1 and "fewer heads" in bwd[0]
    assert cuda_kernel_reasons(q, q, q, None, None, 1.0, 0.0, None, False) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=torch.zeros(2, 3, 5, 4, dtype=torch.float64)), "n_kv_heads.*must divide q's head count 4, got 3"),
    (dict(k=torch.zeros(2, 2, 6, 4, dtype=torch.float64)), "k must have shape"),
    (dict(v=torch.zeros(2, 1, 5, 4, dtype=torch.float64)), "v must have k's shape"),
    (dict(kv_z=torch.ones(4, dtype=torch.float64)), "kv_z must have shape"),
    (dict(causal=1), "causal must be a bool"),
])
def test_bad_inputs_refused_in_one_line(kwargs, match):
    args = dict(q=torch.zeros(2, 4, 5, 4, dtype=torch.float64), k=torch.zeros(2, 2, 5, 4, dtype=torch.float64),
                v=torch.zeros(2, 2, 5, 4, dtype=torch.float64))
    args.update(kwargs)
    with pytest.raises((UserError, ValueError, TypeError), match=match) as e:
        masked_attention(**args)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available() or "triton" not in BACKENDS,
                    reason="interpreter test (GPU runs use these tiles anyway)")
def test_triton_gpu_tiles_causal_gqa():
    """The GPU tiles under the interpreter (float32, head dim 100: forward 16x32, dK/dV 16x32, dQ
    32x32, so the diagonal-block bounds are exercised with BLOCK_M != BLOCK_N); S spans several tiles.
    float32 vs the float64 reference on the same values."""
    from cofi_kernels import configs

    q, k, v, head_z, _, mask = (t.float() if t is not None and t.is_floating_point() else t
                                for t in _case(1, 4, 2, 100, 100, "heads", True, False, seed=8))
    seed = torch.tensor([3, 4], dtype=torch.int64)
    with configs.gpu_configs_forced():
        cfg = configs.attention_config(torch.float32, 100, gpu=True)
        assert cfg.fwd.block_m != cfg.fwd.block_n and cfg.dkdv.block_m != cfg.dkdv.block_n
        ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v, head_z)]
        out, lse = torch.ops.cofi.masked_attention(*ins, mask, 0.1, 0.1, seed, "triton", True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        got = torch.autograd.grad(out, ins, w)
    ref_ins = [t.detach().double().requires_grad_(True) for t in (q, k, v, head_z)]
    ref, ref_lse = masked_attention_core_ref(*ref_ins, mask, 0.1, 0.1, seed, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, torch.autograd.grad(ref, ref_ins, w.double())):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
