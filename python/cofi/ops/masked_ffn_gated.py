"""Gated structured-sparse FFN (SwiGLU, GeGLU, ReGLU): the custom ops behind ``masked_ffn(...,
activation="swiglu", gate_weight=wg)``.

    y = mlp_z * ((gate_fn(x wg^T + bg) * (x w1^T + b1) * int_z) w2^T + b2)

Llama's MLP ``down(silu(gate(x)) * up(x))`` is wg = gate_proj, w1 = up_proj, w2 = down_proj with zero
biases. Registered as ``torch.ops.cofi.masked_ffn_gated`` (+ ``masked_ffn_gated_backward``) with fake
and autograd kernels; backends ``reference``, ``native`` (C++ CPU and CUDA: one GEMM on the stacked
live rows of wg and w1, then a fused gated epilogue) and ``triton``.

Units are shared by the gate and the up projection: a dead unit (int_z exactly 0, or not in
``live_idx``) drops its wg row, w1 row and w2 column. ``h`` (saved for backward) is [N, 2L]: the
live units' gate pre-activations then their up projections (biases included). Live units, host
syncs, the ``mlp_z == 0`` skip and the exact-zero gradient convention are those of ``masked_ffn``
(see its module docstring). The ``activation`` integer is the gate function's code in
``vocab.GATE_FUNCTIONS``.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import _backends as B
from .masked_ffn import live_units
from .reference.masked_ffn import GATE_FUNCTIONS, activation_ref

OP = "masked_ffn_gated"
NATIVE_OP = "masked_ffn_gated_fwd_native"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPES = {"cpu": _FLOATS, "cuda": _FLOATS}


def _triton():
    import cofi_kernels.masked_ffn_gated as k  # lazy: importing triton costs ~1 s

    return k


_native_reasons, _triton_reasons, _ref_reasons = B.first_input_reasons(NATIVE_OP, "x", _DTYPES, _DTYPES, _DTYPES)


# ============================== reference backend =================================================

def _pick(live: torch.Tensor | None, t: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
    return t if (live is None or t is None) else t.index_select(dim, live)


def _fwd_ref(x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, act: int):
    """x: [N, d] -> (y [N, d], h [N, 2L] = [gate pre-activation | up projection])."""
    hg = torch.nn.functional.linear(x, _pick(live, wg), _pick(live, bg))
    hu = torch.nn.functional.linear(x, _pick(live, w1), _pick(live, b1))
    a = activation_ref(hg, GATE_FUNCTIONS[act]) * hu
    zl = _pick(live, int_z)
    if zl is not None:
        a = a * zl
    y = torch.nn.functional.linear(a, _pick(live, w2, 1), b2)
    if mlp_z is not None:
        y = y * mlp_z
    return y, torch.cat([hg, hu], 1)


def _dgate(g: torch.Tensor, h: torch.Tensor, act: int) -> torch.Tensor:
    """g * gate_fn'(h)."""
    if act == 3:
        return torch.ops.aten.silu_backward(g, h)
    if act == 2:
        return g * (h > 0).to(g.dtype)
    return torch.ops.aten.gelu_backward(g, h, approximate="tanh" if act == 1 else "none")


def _bwd_ref(grad, x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, h, act, needs):
    """Explicit formulas (custom-op bodies run below autograd). Returns the gradients of
    [x, wg, bg, w1, b1, w2, b2, int_z, mlp_z] (empty where not needed)."""
    L = h.shape[1] // 2
    hg, hu = h[:, :L], h[:, L:]
    zl = _pick(live, int_z)
    m = 1.0 if mlp_z is None else mlp_z
    s = m if zl is None else zl * m
    f = activation_ref(hg, GATE_FUNCTIONS[act])
    G = grad @ _pick(live, w2, 1)                          # [N, L]
    dhu = G * s * f
    dhg = _dgate(G * s * hu, hg, act)
    fu = f * hu

    def full(part: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        return part if live is None else torch.zeros_like(like).index_copy_(dim, live, part)

    dx = dhg @ _pick(live, wg) + dhu @ _pick(live, w1) if needs[0] else grad.new_empty(0)
    dwg = full(dhg.t() @ x, wg, 0) if needs[1] else grad.new_empty(0)
    dbg = full(dhg.sum(0), bg, 0) if needs[2] else grad.new_empty(0)
    dw1 = full(dhu.t() @ x, w1, 0) if needs[3] else grad.new_empty(0)
    db1 = full(dhu.sum(0), b1, 0) if needs[4] else grad.new_empty(0)
    dw2 = full(grad.t() @ (fu * s), w2, 1) if needs[5] else grad.new_empty(0)
    db2 = grad.sum(0) * m if needs[6] else grad.new_empty(0)
    dz = full((fu * G).sum(0) * m, int_z, 0) if needs[7] else grad.new_empty(0)
    a = fu if zl is None else fu * zl
    dm = ((a * G).sum() + (grad.sum(0) * b2).sum()).reshape(mlp_z.shape) if needs[8] else grad.new_empty(0)
    return [dx, dwg, dbg, dw1, db1, dw2, db2, dz, dm]


B.register(OP, B.BackendImpl("reference", _ref_reasons, _fwd_ref, _bwd_ref))
B.register(OP, B.BackendImpl(
    "native", _native_reasons,
    lambda *a: tuple(torch.ops.cofi.masked_ffn_gated_fwd_native(*a)),
    lambda *a: list(torch.ops.cofi.masked_ffn_gated_bwd_native(*a))))
B.register(OP, B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().masked_ffn_gated_fwd_triton(*a),
    lambda *a: _triton().masked_ffn_gated_bwd_triton(*a)))


# ============================== custom ops ========================================================

def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


@torch.library.custom_op("cofi::masked_ffn_gated", mutates_args=())
def _gated_op(x: torch.Tensor, wg: torch.Tensor, bg: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
              w2: torch.Tensor, b2: torch.Tensor, int_z: torch.Tensor | None, mlp_z: torch.Tensor | None,
              live_idx: torch.Tensor | None, activation: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, d] -> (y [N, d], h [N, 2L]: gate pre-activations and up projections, saved for backward)."""
    live, skip = live_units(int_z, mlp_z, live_idx)
    args = (x.contiguous(), wg.contiguous(), bg.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
            b2.contiguous(), _c(int_z), _c(mlp_z), _c(live), activation)
    if skip:
        impl = B.resolve(OP, backend, *args)  # an impossible explicit backend still raises
        B.record(OP, impl.name, x.device)
        return x.new_zeros(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], 0)
    y, h = B.run(OP, backend, "fwd", *args)
    return y, h


@_gated_op.register_fake
def _(x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live_idx, activation, backend):
    torch._check(x.dim() == 2 and x.shape[1] == w1.shape[1], lambda: "x must be [N, d]")
    torch._check(wg.shape == w1.shape, lambda: "wg must be [F, d] like w1")
    torch._check(w2.shape[0] == w1.shape[1] and w2.shape[1] == w1.shape[0], lambda: "w2 must be [d, F]")
    if live_idx is not None:
        n_live = live_idx.shape[0]
    elif (int_z is None and mlp_z is None) or x.device.type == "meta":
        n_live = w1.shape[0]  # meta tensors carry no mask values: report every unit
    else:
        n_live = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], 2 * n_live)


@torch.library.custom_op("cofi::masked_ffn_gated_backward", mutates_args=())
def _gated_bwd_op(grad: torch.Tensor, x: torch.Tensor, wg: torch.Tensor, bg: torch.Tensor, w1: torch.Tensor,
                  b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, int_z: torch.Tensor | None,
                  mlp_z: torch.Tensor | None, live_idx: torch.Tensor | None, h: torch.Tensor, activation: int,
                  needs: list[bool], backend: str) -> list[torch.Tensor]:
    """Returns the gradients of [x, wg, bg, w1, b1, w2, b2, int_z, mlp_z]; an empty tensor where not needed."""
    needs = [bool(n) for n in needs]
    live, skip = live_units(int_z, mlp_z, live_idx)
    ws = (x.contiguous(), wg.contiguous(), bg.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
          b2.contiguous())
    if not skip:
        args = (grad.contiguous(), *ws, _c(int_z), _c(mlp_z), _c(live), h.contiguous(), activation, needs)
        return list(B.run(OP, backend, "bwd", *args))
    # mlp_z == 0: every gradient is 0 except d mlp_z = sum(grad * inner FFN output).
    ins = (x, wg, bg, w1, b1, w2, b2, int_z)
    out = [torch.zeros_like(t) if (t is not None and n) else grad.new_empty(0) for t, n in zip(ins, needs)]
    if needs[8]:
        live2, _ = live_units(int_z, None, None)
        inner, _ = B.run(OP, backend, "fwd", *ws, _c(int_z), None, _c(live2), activation)
        out.append((grad * inner).sum().reshape(mlp_z.shape))
    else:
        impl = B.resolve(OP, backend, x)
        B.record(OP, impl.name, x.device)
        out.append(grad.new_empty(0))
    return out


@_gated_bwd_op.register_fake
def _(grad, x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live_idx, h, activation, needs, backend):
    ins = (x, wg, bg, w1, b1, w2, b2, int_z, mlp_z)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n) else grad.new_empty(0)
            for t, n in zip(ins, needs)]


def _setup(ctx, inputs, output):
    *tensors, activation, backend = inputs
    ctx.save_for_backward(*tensors, output[1])
    ctx.args = (activation, backend)


def _backward(ctx, grad, _grad_h):
    x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live_idx, h = ctx.saved_tensors
    activation, backend = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:9]]
    needs[7] = needs[7] and int_z is not None
    needs[8] = needs[8] and mlp_z is not None
    if grad is None or not any(needs):
        return (None,) * 12
    grads = torch.ops.cofi.masked_ffn_gated_backward(grad, x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live_idx, h,
                                                     activation, needs, backend)
    return (*[g if n else None for g, n in zip(grads, needs)], None, None, None)


_gated_op.register_autograd(_backward, setup_context=_setup)


# ============================== native fakes ======================================================

if _ext.native_loaded():
    try:
        @torch.library.register_fake("cofi::masked_ffn_gated_fwd_native")
        def _(x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, activation):
            n_live = live.shape[0] if live is not None else w1.shape[0]
            return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], 2 * n_live)

        @torch.library.register_fake("cofi::masked_ffn_gated_bwd_native")
        def _(grad, x, wg, bg, w1, b1, w2, b2, int_z, mlp_z, live, h, activation, needs):
            ins = (x, wg, bg, w1, b1, w2, b2, int_z, mlp_z)
            return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n)
                    else grad.new_empty(0) for t, n in zip(ins, needs)]
    except RuntimeError:  # pragma: no cover - extension built before this op existed
        pass


__all__ = ["OP"]
