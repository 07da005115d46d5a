"""masked_attention's ``sdpa`` backend (scaled_dot_product_attention on the live heads) vs the reference."""
from __future__ import annotations

import pytest
import torch
from _tolerances import tol

from cofi import ops
from cofi.ops import _backends as B
from cofi.ops.masked_attention import masked_attention, masked_attention_packed
from cofi.ops.reference.masked_attention import masked_attention_ref

OP = "masked_attention"
F64 = torch.float64


def fresh(Bsz, H, S, D, gate, pad, seed, dtype=F64):
    """Random q, k, v, head_z, key_padding_mask; ``gate``: none | rand | some_dead | all_dead;
    ``pad``: None | rand | empty_row (batch row 0 has no key at all)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(Bsz, H, S, D, generator=g, dtype=dtype) for _ in range(3))
    z = None
    if gate != "none":
        z = torch.rand(H, generator=g, dtype=dtype) + 0.1
        if gate == "some_dead" and H:
            z[torch.randperm(H, generator=g)[: max(1, H // 2)]] = 0.0
        elif gate == "all_dead":
            z.zero_()
    mask = None
    if pad is not None:
        mask = torch.rand(Bsz, S, generator=g) > 0.4
        if pad == "empty_row" and Bsz:
            mask[0] = False
    return q, k, v, z, mask


CASES = [  # (name, B, H, S, D, gate, pad)
    ("basic", 2, 3, 9, 8, "rand", None),
    ("some_dead_pad", 3, 5, 13, 7, "some_dead", "rand"),
    ("empty_key_row", 3, 4, 11, 6, "some_dead", "empty_row"),
    ("no_gate_pad", 2, 2, 17, 16, "none", "rand"),
    ("all_dead", 2, 3, 5, 4, "all_dead", "rand"),
    ("H0", 2, 0, 5, 4, "rand", None),
    ("B0", 0, 3, 5, 4, "rand", "rand"),
    ("S0", 2, 3, 0, 4, "some_dead", "rand"),
    ("D0", 2, 3, 5, 0, "some_dead", None),
    ("S1", 3, 2, 1, 3, "rand", "rand"),
]


def run(backend, q, k, v, z, mask):
    """(out, grads of sum(out * go) w.r.t. q, k, v[, head_z]) through ``backend``."""
    ins = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    zz = z.detach().clone().requires_grad_(True) if z is not None else None
    out = masked_attention(*ins, zz, mask, backend=backend)
    assert ops.last_backend(OP) == backend
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=out.dtype)
    wrt = ins + ([zz] if zz is not None else [])
    grads = torch.autograd.grad((out * go).sum(), wrt, allow_unused=True) if out.numel() else [None] * len(wrt)
    return out, [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]


def assert_matches_reference(q, k, v, z, mask, dtype, what):
    (o1, g1), (o2, g2) = run("sdpa", q, k, v, z, mask), run("reference", q, k, v, z, mask)
    torch.testing.assert_close(o1, o2, **tol(OP, "fwd", dtype), msg=lambda m: f"{what} out: {m}")
    for i, (a, b) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(a, b, **tol(OP, "bwd", dtype), msg=lambda m, i=i: f"{what} grad[{i}]: {m}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [1, 2])
def test_float64_vs_reference(case, seed):
    name, *shape = case
    q, k, v, z, mask = fresh(*shape, seed=seed)
    assert_matches_reference(q, k, v, z, mask, F64, name)


def test_dead_heads_and_empty_rows_are_exact_zeros():
    q, k, v, z, mask = fresh(3, 4, 11, 6, "some_dead", "empty_row", seed=3)
    out, grads = run("sdpa", q, k, v, z, mask)
    dead = z == 0
    assert (out[:, dead] == 0).all() and (out[0] == 0).all()
    assert all((g[:, dead] == 0).all() for g in grads[:3]) and (grads[3][dead] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)


def test_dead_head_inputs_never_read():
    q, k, v, z, mask = fresh(2, 3, 7, 5, "rand", "rand", seed=4)
    z[1] = 0.0
    clean = masked_attention(q, k, v, z, mask, backend="sdpa")
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    for t in (qp, kp, vp):
        t[:, 1] = float("nan")
    torch.testing.assert_close(masked_attention(qp, kp, vp, z, mask, backend="sdpa"), clean, atol=0, rtol=0)


def test_strided_packed_qkv():
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 9, 3, 4, 8, generator=g, dtype=F64)
    z = torch.tensor([1.0, 0.0, 0.5, 0.25], dtype=F64)
    mask = torch.rand(2, 9, generator=g) > 0.3
    want = masked_attention_ref(*(qkv[:, :, i].transpose(1, 2).contiguous() for i in range(3)), z, mask)
    got = masked_attention_packed(qkv, z, mask, backend="sdpa")
    torch.testing.assert_close(got, want, **tol(OP, "fwd", F64))
    assert got.is_contiguous()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert_matches_reference(q, k, v, z, mask, F64, "packed")
    k_expanded = k[:, :, :1].expand_as(k)  # stride 0 along S
    assert_matches_reference(q, k_expanded, v, z, mask, F64, "expanded")


def test_float32_and_bfloat16():
    q, k, v, z, mask = fresh(2, 4, 33, 16, "some_dead", "rand", seed=6, dtype=torch.float32)
    assert_matches_reference(q, k, v, z, mask, torch.float32, "float32")
    ref = masked_attention_ref(q, k, v, z, mask)
    lp = [t.to(torch.bfloat16) for t in (q, k, v, z)]
    ref_lp = masked_attention(*lp, mask, backend="reference").float()
    got = masked_attention(*lp, mask, backend="sdpa")
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 2 * (ref_lp - ref).abs().max() + 1e-3


def test_autocast_bfloat16():
    q, k, v, z, mask = fresh(2, 4, 16, 8, "some_dead", "rand", seed=7, dtype=torch.float32)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, z)]
    with torch.autocast("cpu", torch.bfloat16):
        out = masked_attention(*ins[:3], ins[3], mask, backend="sdpa")
    assert out.dtype == torch.bfloat16  # matmul-like: runs in the autocast dtype
    ref = masked_attention_ref(q, k, v, z, mask)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(out.float().sum(), ins)
    assert all(g.dtype == t.dtype and torch.isfinite(g).all() for g, t in zip(grads, ins))


def test_gradcheck():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 3, 5, 3, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    z = torch.tensor([0.7, 1.0, 0.4], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, True], [False] * 5])
    fn = lambda q, k, v, z: masked_attention(q, k, v, z, mask, backend="sdpa")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, z), eps=1e-6, atol=1e-6, fast_mode=True)
    # dead head (gate exactly 0) in the gathered path: gradients w.r.t. q, k, v of the live ones
    z0 = torch.tensor([0.7, 0.0, 0.4], dtype=F64)
    fn0 = lambda q, k, v: masked_attention(q, k, v, z0, mask, backend="sdpa")  # noqa: E731
    assert torch.autograd.gradcheck(fn0, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("gate", ["some_dead", "none"])
def test_compile_fullgraph(gate):
    q, k, v, z, mask = fresh(2, 4, 7, 5, gate, "empty_row", seed=9)
    wrt = [t.clone().requires_grad_(True) for t in (q, k, v) + ((z,) if z is not None else ())]

    def f(q, k, v, *z):
        return (masked_attention(q, k, v, z[0] if z else None, mask, backend="sdpa") ** 2).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(cf(*wrt), wrt)
    want = torch.autograd.grad(f(*wrt), wrt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(OP, "bwd", F64))


def test_dropout_refused_in_one_line():
    q, k, v, z, mask = fresh(1, 2, 4, 3, "rand", None, seed=10)
    with pytest.raises(B.BackendError, match=r"backend 'sdpa' cannot run this call: dropout_p > 0") as e:
        masked_attention(q, k, v, z, dropout_p=0.1, backend="sdpa")
    assert "\n" not in str(e.value)


def test_custom_op_and_other_ops_refuse_sdpa():
    q, k, v, z, mask = fresh(1, 2, 4, 3, "rand", None, seed=11)
    with pytest.raises(B.BackendError, match="plain torch code run by cofi.ops.masked_attention"):
        torch.ops.cofi.masked_attention(q, k, v, z, None, 0.5, 0.0, None, "sdpa")
    x = torch.randn(3, 4, dtype=F64)
    with pytest.raises(B.BackendError, match="'sdpa' is not implemented for this op"):
        ops.masked_layer_norm(x, None, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64), None, backend="sdpa")
    table = ops.backends()
    assert table[OP]["sdpa"] == {"cpu": "available", "cuda": "available"}
    assert table["masked_ffn"]["sdpa"]["cpu"] == ["not implemented for this op"]


def test_auto_order():
    assert B.priority(OP, "cuda")[0] == "sdpa"
    assert "sdpa" not in B.priority(OP, "cpu")  # CPU auto unchanged (benchmarks/README.md)


def test_auto_with_sdpa_first_falls_through_for_dropout(monkeypatch):
    """With sdpa first in the order (as on CUDA), auto runs it; dropout makes it pick the next one
    inside the custom op, with the same result as forcing that one."""
    monkeypatch.setitem(B.OP_PRIORITY, OP, {"cpu": ("sdpa", "reference")})
    q, k, v, z, mask = fresh(2, 3, 6, 4, "some_dead", "rand", seed=12)
    out = masked_attention(q, k, v, z, mask)
    assert ops.last_backend(OP) == "sdpa"
    torch.testing.assert_close(out, masked_attention_ref(q, k, v, z, mask), **tol(OP, "fwd", F64))
    a = masked_attention(q, k, v, z, mask, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
    assert ops.last_backend(OP) == "reference"
    b = masked_attention_ref(q, k, v, z, mask, dropout_p=0.2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with ops.use_backend("sdpa"):
        masked_attention(q, k, v, z, mask)
    assert ops.last_backend(OP) == "sdpa"
