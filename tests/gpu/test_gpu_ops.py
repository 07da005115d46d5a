"""Every op on every CUDA backend vs the eager reference on the GPU: forward and backward, dropout,
strided packed QKV, half precision, bf16 autocast, torch.compile, a batch x heads grid past 65,535.

Errors are ||got - want|| / ||want|| (the ``reference`` backend on the same device in float32): float32
kernels land far under 1e-3 (TF32 dots near 3e-4), bf16 between 1e-3 and 1e-2.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from cofi import ops
from cofi.ops import _backends as B

FP32_ERR, BF16_ERR = 2e-3, 3e-2


def backends_on(dev: torch.device, op: str) -> list[str]:
    """The non-reference backends of ``op`` to run on ``dev`` (the CPU dry run: no Triton)."""
    names = [n for n in B.op_backends(op) if n != "reference"]
    return [n for n in names if dev.type == "cuda" or n != "triton"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g, w = got.detach().double(), want.detach().double()
    assert torch.isfinite(g).all(), "NaN or inf"
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


def _rand(g: torch.Generator, dev: torch.device, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dev).requires_grad_()


Case = tuple[Callable[[str | None], tuple[torch.Tensor, ...]], list[torch.Tensor]]


def attention_case(dev: torch.device, seed: int = 0, dropout_p: float = 0.0) -> Case:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_rand(g, dev, 3, 6, 77, 64) for _ in range(3))
    z = torch.tensor([1.0, 0.0, 0.3, 0.8, 0.0, 0.5], device=dev, requires_grad=True)
    mask = (torch.rand(3, 77, generator=g) > 0.2).to(dev)
    mask[1] = False  # a batch row with no key at all

    def call(backend):
        gen = torch.Generator(device=dev).manual_seed(5) if dropout_p else None
        return (ops.masked_attention(q, k, v, z, mask, dropout_p=dropout_p, generator=gen, backend=backend),)
    return call, [q, k, v, z]


def ffn_case(dev: torch.device, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, dev, 2, 37, 96)
    w1, b1, w2, b2 = _rand(g, dev, 200, 96, scale=0.1), _rand(g, dev, 200), _rand(g, dev, 96, 200, scale=0.1), \
        _rand(g, dev, 96)
    z = torch.rand(200, generator=g)
    z[::3] = 0
    z, m = z.to(dev).requires_grad_(), torch.tensor(0.7, device=dev, requires_grad=True)
    return (lambda backend: (ops.masked_ffn(x, w1, b1, w2, b2, z, m, backend=backend),)), [x, w1, b1, w2, b2, z, m]


def layer_norm_case(dev: torch.device, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x, r, w, b = _rand(g, dev, 3, 41, 96), _rand(g, dev, 3, 41, 96), _rand(g, dev, 96), _rand(g, dev, 96)
    z = torch.rand(96, generator=g) + 0.2
    z[::5] = 0
    z = z.to(dev).requires_grad_()
    return (lambda backend: (ops.masked_layer_norm(x, r, w, b, z, backend=backend),)), [x, r, w, b, z]


def rms_norm_case(dev: torch.device, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x, r, w = _rand(g, dev, 3, 41, 96), _rand(g, dev, 3, 41, 96), _rand(g, dev, 96)
    z = torch.rand(96, generator=g) + 0.2
    z[::5] = 0
    z = z.to(dev).requires_grad_()
    return (lambda backend: (ops.masked_rms_norm(x, r, w, z, backend=backend),)), [x, r, w, z]


def _log_alpha(dev: torch.device, n: int = 5000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    la = (torch.randn(n, generator=g) * 3).to(dev).requires_grad_()
    u = (torch.rand(n, generator=g) * 0.998 + 0.001).to(dev)
    return la, u


def hc_sample_case(dev: torch.device) -> Case:
    la, u = _log_alpha(dev)
    return (lambda backend: (ops.hard_concrete_sample(la, noise=u, backend=backend),)), [la]


def hc_keep_case(dev: torch.device) -> Case:
    la, _ = _log_alpha(dev)
    return (lambda backend: (ops.hard_concrete_keep_prob(la, backend=backend),)), [la]


def hc_deterministic_case(dev: torch.device) -> Case:
    la, _ = _log_alpha(dev)
    rows = la.detach().reshape(50, 100)
    return (lambda backend: (ops.hard_concrete_deterministic(rows, "soft", backend=backend),)), []


def _sizes(dev: torch.device):
    from cofi.vocab import group_shapes

    L, d, H, F = 3, 48, 4, 80
    shapes = group_shapes(L, d, H, F)
    la, u = _log_alpha(dev, sum(torch.Size(s).numel() for s in shapes.values()))
    offsets, i = {}, 0
    for k, s in shapes.items():
        offsets[k] = i
        i += torch.Size(s).numel()
    return (L, d, H, F), shapes, offsets, la, u


def expected_size_case(dev: torch.device) -> Case:
    (L, d, H, F), shapes, offsets, la, _ = _sizes(dev)

    def call(backend):
        keep = {k: torch.sigmoid(la[o:o + torch.Size(shapes[k]).numel()]).view(shapes[k]) for k, o in offsets.items()}
        return ops.expected_size(num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F, backend=backend,
                                 **keep)
    return call, [la]


def hc_step_case(dev: torch.device) -> Case:
    (L, d, H, F), _, offsets, la, u = _sizes(dev)

    def call(backend):
        r = ops.hard_concrete_step(la, offsets, num_layers=L, hidden_size=d, num_heads=H, intermediate_size=F,
                                   noise=u, backend=backend)
        return r.z, r.keep, r.expected_params, r.expected_sparsity
    return call, [la]


def ffn_gated_case(dev: torch.device, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, dev, 2, 37, 96)
    wg, w1, w2 = _rand(g, dev, 200, 96, scale=0.1), _rand(g, dev, 200, 96, scale=0.1), _rand(g, dev, 96, 200, scale=0.1)
    z = torch.rand(200, generator=g)
    z[::3] = 0
    z, m = z.to(dev).requires_grad_(), torch.tensor(0.7, device=dev, requires_grad=True)
    return (lambda backend: (ops.masked_ffn(x, w1, None, w2, None, z, m, activation="swiglu", gate_weight=wg,
                                            backend=backend),)), [x, wg, w1, w2, z, m]


CASES: dict[str, Callable[[torch.device], Case]] = {
    "masked_attention": attention_case, "masked_ffn": ffn_case, "masked_layer_norm": layer_norm_case,
    "masked_rms_norm": rms_norm_case, "hard_concrete_sample": hc_sample_case, "hard_concrete_keep_prob": hc_keep_case,
    "hard_concrete_deterministic": hc_deterministic_case, "expected_size": expected_size_case,
    "hard_concrete_step": hc_step_case, "masked_ffn_gated": ffn_gated_case,
}
PAIRS = [(op, b) for op in B.ops() for b in B.op_backends(op) if b != "reference" and op in CASES]


def run_case(call, leaves, backend) -> list[torch.Tensor]:
    """Outputs and the gradients of a fixed random projection of them w.r.t. ``leaves``."""
    outs = call(backend)
    if leaves:
        g = torch.Generator().manual_seed(7)
        loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
        return [*outs, *torch.autograd.grad(loss, leaves, allow_unused=True)]
    return list(outs)


def assert_close_to_reference(call, leaves, backend, bound, what):
    got, want = run_case(call, leaves, backend), run_case(call, leaves, "reference")
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None or b.numel() == 0 or b.abs().max() == 0:
            assert a is None or (a == 0).all(), f"{what}[{i}]: want zeros"
            continue
        assert rel_err(a, b) <= bound, f"{what}[{i}]: relative error {rel_err(a, b):.2e} > {bound}"


def test_every_op_has_a_case():
    assert not [op for op in B.ops() if op not in CASES], "add a case for every registered op"


@pytest.mark.parametrize("op,backend", PAIRS, ids=[f"{o}-{b}" for o, b in PAIRS])
def test_forward_backward_vs_reference(dev, op, backend):
    if backend not in backends_on(dev, op):
        pytest.skip(f"{backend} does not run on {dev.type}")
    call, leaves = CASES[op](dev)
    try:
        call(backend)
    except B.BackendError as e:  # e.g. a build without CUDA kernels: tools/gpu_check.sh's build stage says
        pytest.skip(str(e))
    assert ops.last_backend(op) == backend
    assert_close_to_reference(call, leaves, backend, FP32_ERR, f"{op}/{backend}")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_attention_dropout_same_mask_as_reference(dev, backend):
    if backend not in backends_on(dev, "masked_attention"):
        pytest.skip(f"{backend} does not run on {dev.type}")
    call, leaves = attention_case(dev, seed=1, dropout_p=0.2)
    assert_close_to_reference(call, leaves, backend, FP32_ERR, f"dropout/{backend}")


def test_attention_auto_on_cuda_is_sdpa_then_reference(dev):
    call, _ = attention_case(dev)
    call(None)
    assert ops.last_backend("masked_attention") == ("sdpa" if dev.type == "cuda" else
                                                    ("native" if not B.impl("masked_attention", "native").reasons(
                                                        torch.zeros(1, 1, 1, 1)) else "reference"))
    if dev.type == "cuda":
        attention_case(dev, dropout_p=0.1)[0](None)
        assert ops.last_backend("masked_attention") == "reference"  # sdpa refuses dropout


@pytest.mark.parametrize("backend", ["native", "triton", "sdpa", "reference"])
def test_attention_packed_qkv_strided(dev, backend):
    if backend != "reference" and backend not in backends_on(dev, "masked_attention"):
        pytest.skip(f"{backend} does not run on {dev.type}")
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 50, 3, 4, 64, generator=g).to(dev).requires_grad_()
    z = torch.tensor([1.0, 0.0, 0.5, 0.25], device=dev)
    mask = (torch.rand(2, 50, generator=g) > 0.3).to(dev)
    got = ops.masked_attention_packed(qkv, z, mask, backend=backend)
    (dg,) = torch.autograd.grad(got.sum(), qkv)
    q, k, v = (qkv.detach()[:, :, i].transpose(1, 2).contiguous().requires_grad_() for i in range(3))
    want = ops.masked_attention(q, k, v, z, mask, backend="reference")
    dw = torch.stack(torch.autograd.grad(want.sum(), (q, k, v)), 2).transpose(1, 3)
    assert rel_err(got, want) <= FP32_ERR and rel_err(dg, dw) <= FP32_ERR


@pytest.mark.parametrize("backend", ["native", "triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_half_inputs(dev, backend, dtype):
    """FlashAttention's rule: error vs an fp32 reference at most 2x the reference's own in dtype."""
    if dev.type != "cuda" or backend not in backends_on(dev, "masked_attention"):
        pytest.skip("half-precision kernels are CUDA only")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 64, device=dev, generator=g) for _ in range(3))
    z = torch.tensor([1.0, 0.0, 0.3, 0.8], device=dev)
    mask = torch.rand(2, 200, device=dev, generator=g) > 0.2
    ref = ops.masked_attention(q, k, v, z, mask, backend="reference")
    lp = [t.to(dtype) for t in (q, k, v)]
    ref_lp = ops.masked_attention(*lp, z, mask, backend="reference").float()
    got = ops.masked_attention(*lp, z, mask, backend=backend).float()
    assert (got - ref).abs().max() <= 2 * (ref_lp - ref).abs().max() + 1e-5


@pytest.mark.parametrize("backend", ["native", "triton", "sdpa"])
def test_attention_grid_past_65535(dev, backend):
    """batch x live heads = 72,000 > 65,535 (the old grid.y limit): every pair is computed."""
    if dev.type != "cuda" or backend not in backends_on(dev, "masked_attention"):
        pytest.skip("a CUDA launch-grid check")
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(6000, 12, 4, 32, device=dev, generator=g) for _ in range(3))
    z = torch.rand(12, device=dev, generator=g) + 0.5
    got = ops.masked_attention(q, k, v, z, backend=backend)
    want = ops.masked_attention(q, k, v, z, backend="reference")
    assert rel_err(got, want) <= FP32_ERR and (got[-1] != 0).any()


def test_bf16_autocast_every_matmul_op(dev):
    """Under autocast the ops run in bf16 (or keep fp32, per their policy) and stay within bf16
    error of the fp32 reference; gradients come back in the inputs' dtype."""
    dt = dev.type
    for op, make in (("masked_attention", attention_case), ("masked_ffn", ffn_case),
                     ("masked_layer_norm", layer_norm_case)):
        call, leaves = make(dev)
        want = run_case(call, leaves, "reference")
        with torch.autocast(dt, torch.bfloat16):
            outs = call(None)
        g = torch.Generator().manual_seed(7)
        loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
        grads = torch.autograd.grad(loss, leaves)
        assert all(gr.dtype == t.dtype for gr, t in zip(grads, leaves)), op
        for i, (a, b) in enumerate(zip([*outs, *grads], want)):
            if b.abs().max() > 0:
                assert rel_err(a.float(), b) <= BF16_ERR, f"{op}[{i}] ran {ops.last_backend(op)}"


def test_torch_compile_inductor(dev):
    """Attention + FFN + LayerNorm (auto backends) under torch.compile(fullgraph) == eager."""
    a_call, a_leaves = attention_case(dev)
    f_call, f_leaves = ffn_case(dev)
    n_call, n_leaves = layer_norm_case(dev)

    def f():
        return a_call(None)[0].sum() + f_call(None)[0].square().mean() + n_call(None)[0].abs().mean()

    leaves = a_leaves + f_leaves + n_leaves
    want = torch.autograd.grad(f(), leaves)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        if b.abs().max() > 0:
            assert rel_err(a, b) <= FP32_ERR, f"grad {i}"
