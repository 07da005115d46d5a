"""Structured-sparse feed-forward block: y = mlp_z * ((act(x w1^T + b1) * int_z) w2^T + b2).

Public API: ``masked_ffn(x, w1, b1, w2, b2, int_z=None, mlp_z=None, activation="gelu", backend=None,
live_idx=None, gate_weight=None, gate_bias=None)`` registered as ``torch.ops.cofi.masked_ffn`` (+
``masked_ffn_backward``) with fake and autograd kernels. Gated activations (SwiGLU, ...) run
``torch.ops.cofi.masked_ffn_gated`` (``masked_ffn_gated.py``).

Cost model. Only *live* units are computed: the kernels gather the live rows of w1 / columns of w2
(or read them through the index list) and run both GEMMs on them, with bias + activation + gate
fused into the first GEMM's epilogue; gradients of w1, b1, w2 are written into full-size tensors
(zero for dead units). ``mlp_z`` exactly 0 skips the whole op (output 0).

Host syncs. Finding the live units needs one device->host copy of the masks per call (forward,
and again in backward). A model that already has its masks on the host (CoFi copies all masks
once per step) passes ``live_idx`` and the op does no sync at all: ``live_idx`` (int64 [L], on
x's device) lists the units to compute; units not listed contribute nothing, exactly as if their
int_z were 0 (it is not checked against int_z: that would cost the sync it avoids; nor for duplicates,
which count twice; a host-side ``live_idx`` is checked to index [0, F)). With
``live_idx`` given the op never inspects ``mlp_z`` on the host either, so the ``mlp_z == 0`` skip
is then the caller's (skip the call, or pass an empty ``live_idx``).

Gradient convention at exact zeros. A unit whose gate is exactly 0 is *absent*: its d int_z is
reported as 0 (the analytic value would need the dead unit's activations, i.e. the dense cost this
op exists to avoid). In CoFi the gates come from hard-concrete sampling, whose clip already gives a
zero gradient wherever z == 0, so training is unchanged. ``mlp_z == 0`` still gets its exact
gradient sum(grad * inner) (it costs only the live-unit FFN, computed in backward when needed).
``reference.masked_ffn.masked_ffn_ref`` follows the same convention.
"""
from __future__ import annotations

import torch

from .. import _ext
from ..errors import UserError
from . import _backends as B
from ._validate import check_tensor, has_data
from .reference.masked_ffn import ACTIVATIONS, GATE_FUNCTIONS, GATED_ACTIVATIONS, activation_ref, masked_ffn_ref

OP = "masked_ffn"
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # gelu=0, gelu_tanh=1, relu=2

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Half inputs on CPU (autocast): native runs the GEMMs in the input dtype and the epilogue in float.
_NATIVE_DTYPES = {"cpu": _FLOATS, "cuda": _FLOATS}
_TRITON_DTYPES = {"cpu": _FLOATS, "cuda": _FLOATS}
_REF_DTYPES = {"cpu": _FLOATS, "cuda": _FLOATS}


def _triton():
    import cofi_kernels.masked_ffn as k  # lazy: importing triton costs ~1 s

    return k


_native_reasons, _triton_reasons, _ref_reasons = B.first_input_reasons(
    "masked_ffn_fwd_native", "x", _NATIVE_DTYPES, _TRITON_DTYPES, _REF_DTYPES)


# ============================== live units ========================================================

def live_units(int_z: torch.Tensor | None, mlp_z: torch.Tensor | None,
               live_idx: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """(live, skip): ``live`` is an int64 index tensor of the units to compute, or None for all of
    them; ``skip`` is True when mlp_z == 0. At most one device->host copy (none with live_idx)."""
    if live_idx is not None:
        return live_idx, False
    parts = ([mlp_z.reshape(1)] if mlp_z is not None else []) + ([int_z] if int_z is not None else [])
    if not parts:
        return None, False
    nz = torch.cat(parts).ne(0).cpu()  # the one sync
    if mlp_z is not None:
        if not bool(nz[0]):
            return None, True
        nz = nz[1:]
    if int_z is None or bool(nz.all()):
        return None, False
    return torch.nonzero(nz).squeeze(1).to(int_z.device, non_blocking=True), False


# ============================== reference backend =================================================

def _live_forward(x, w1, b1, w2, b2, int_z, mlp_z, live, act: int):
    """Differentiable eager forward over the live units: (y [N, d], h [N, L])."""
    if live is not None:
        w1, b1, w2 = w1.index_select(0, live), b1.index_select(0, live), w2.index_select(1, live)
        int_z = int_z.index_select(0, live) if int_z is not None else None
    h = torch.nn.functional.linear(x, w1, b1)
    a = activation_ref(h, ACTIVATIONS[act])
    if int_z is not None:
        a = a * int_z
    y = torch.nn.functional.linear(a, w2, b2)
    if mlp_z is not None:
        y = y * mlp_z
    return y, h


def _fwd_ref(x, w1, b1, w2, b2, int_z, mlp_z, live, act):
    y, h = _live_forward(x, w1, b1, w2, b2, int_z, mlp_z, live, act)
    return y, h.contiguous()


def _act_bwd(g: torch.Tensor, h: torch.Tensor, act: int) -> torch.Tensor:
    """g * act'(h)."""
    if act == 2:
        return g * (h > 0).to(g.dtype)
    return torch.ops.aten.gelu_backward(g, h, approximate="tanh" if act == 1 else "none")


def _bwd_ref(grad, x, w1, b1, w2, b2, int_z, mlp_z, live, h, act, needs):
    """Explicit formulas (custom-op bodies run below autograd, so no autograd.grad here)."""
    w1l, w2l = (w1, w2) if live is None else (w1.index_select(0, live), w2.index_select(1, live))
    zl = None if int_z is None else (int_z if live is None else int_z.index_select(0, live))
    m = 1.0 if mlp_z is None else mlp_z
    f = activation_ref(h, ACTIVATIONS[act])
    a = f if zl is None else f * zl
    G = grad @ w2l                                       # [N, L]
    s = m if zl is None else zl * m
    dh = _act_bwd(G * s, h, act)

    def full(part: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
        if live is None:
            return part
        return torch.zeros_like(like).index_copy_(dim, live, part)

    dx = dh @ w1l if needs[0] else grad.new_empty(0)
    dw1 = full(dh.t() @ x, w1, 0) if needs[1] else grad.new_empty(0)
    db1 = full(dh.sum(0), b1, 0) if needs[2] else grad.new_empty(0)
    dw2 = full((grad.t() @ a) * m, w2, 1) if needs[3] else grad.new_empty(0)
    db2 = grad.sum(0) * m if needs[4] else grad.new_empty(0)
    dz = full((f * G).sum(0) * m, int_z, 0) if needs[5] else grad.new_empty(0)
    dm = ((a * G).sum() + (grad.sum(0) * b2).sum()).reshape(mlp_z.shape) if needs[6] else grad.new_empty(0)
    return [dx, dw1, db1, dw2, db2, dz, dm]


B.register(OP, B.BackendImpl("reference", _ref_reasons, _fwd_ref, _bwd_ref))
B.register(OP, B.BackendImpl(
    "native", _native_reasons,
    lambda *a: tuple(torch.ops.cofi.masked_ffn_fwd_native(*a)),
    lambda *a: list(torch.ops.cofi.masked_ffn_bwd_native(*a))))
B.register(OP, B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().masked_ffn_fwd_triton(*a),
    lambda *a: _triton().masked_ffn_bwd_triton(*a)))


# ============================== custom ops ========================================================

def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


@torch.library.custom_op("cofi::masked_ffn", mutates_args=())
def _ffn_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
            int_z: torch.Tensor | None, mlp_z: torch.Tensor | None, live_idx: torch.Tensor | None,
            activation: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, d] -> (y [N, d], h [N, L]: pre-activation of the live units, saved for backward)."""
    live, skip = live_units(int_z, mlp_z, live_idx)
    args = (x.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), _c(int_z),
            _c(mlp_z), _c(live), activation)
    if skip:
        impl = B.resolve(OP, backend, *args)  # an impossible explicit backend still raises
        B.record(OP, impl.name, x.device)
        return x.new_zeros(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], 0)
    y, h = B.run(OP, backend, "fwd", *args)
    return y, h


@_ffn_op.register_fake
def _(x, w1, b1, w2, b2, int_z, mlp_z, live_idx, activation, backend):
    torch._check(x.dim() == 2 and x.shape[1] == w1.shape[1], lambda: "x must be [N, d]")
    torch._check(w2.shape[0] == w1.shape[1] and w2.shape[1] == w1.shape[0], lambda: "w2 must be [d, F]")
    if live_idx is not None:
        n_live = live_idx.shape[0]
    elif (int_z is None and mlp_z is None) or x.device.type == "meta":
        # meta tensors carry no mask values: report every unit (h is internal, saved for backward)
        n_live = w1.shape[0]
    else:
        n_live = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], n_live)


@torch.library.custom_op("cofi::masked_ffn_backward", mutates_args=())
def _ffn_bwd_op(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, int_z: torch.Tensor | None, mlp_z: torch.Tensor | None,
                live_idx: torch.Tensor | None, h: torch.Tensor, activation: int, needs: list[bool],
                backend: str) -> list[torch.Tensor]:
    """Returns [dx, dw1, db1, dw2, db2, d int_z, d mlp_z]; an empty tensor where not needed."""
    needs = [bool(n) for n in needs]
    live, skip = live_units(int_z, mlp_z, live_idx)
    if not skip:
        args = (grad.contiguous(), x.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
                b2.contiguous(), _c(int_z), _c(mlp_z), _c(live), h.contiguous(), activation, needs)
        return list(B.run(OP, backend, "bwd", *args))
    # mlp_z == 0: every gradient is 0 except d mlp_z = sum(grad * inner FFN output).
    ins = (x, w1, b1, w2, b2, int_z)
    out = [torch.zeros_like(t) if (t is not None and n) else grad.new_empty(0) for t, n in zip(ins, needs)]
    if needs[6]:
        live2, _ = live_units(int_z, None, None)
        inner, _ = B.run(OP, backend, "fwd", x.contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
                         b2.contiguous(), _c(int_z), None, _c(live2), activation)
        out.append((grad * inner).sum().reshape(mlp_z.shape))
    else:
        impl = B.resolve(OP, backend, x)
        B.record(OP, impl.name, x.device)
        out.append(grad.new_empty(0))
    return out


@_ffn_bwd_op.register_fake
def _(grad, x, w1, b1, w2, b2, int_z, mlp_z, live_idx, h, activation, needs, backend):
    ins = (x, w1, b1, w2, b2, int_z, mlp_z)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n) else grad.new_empty(0)
            for t, n in zip(ins, needs)]


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, int_z, mlp_z, live_idx, activation, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, int_z, mlp_z, live_idx, output[1])
    ctx.args = (activation, backend)


def _ffn_backward(ctx, grad, _grad_h):
    x, w1, b1, w2, b2, int_z, mlp_z, live_idx, h = ctx.saved_tensors
    activation, backend = ctx.args
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    needs[5] = needs[5] and int_z is not None
    needs[6] = needs[6] and mlp_z is not None
    if grad is None or not any(needs):
        return (None,) * 10
    grads = torch.ops.cofi.masked_ffn_backward(grad, x, w1, b1, w2, b2, int_z, mlp_z, live_idx, h, activation,
                                               needs, backend)
    return (*[g if n else None for g, n in zip(grads, needs)], None, None, None)


_ffn_op.register_autograd(_ffn_backward, setup_context=_ffn_setup)


# ============================== public API ========================================================

def masked_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    int_z: torch.Tensor | None = None,
    mlp_z: torch.Tensor | None = None,
    activation: str = "gelu",
    backend: str | None = None,
    live_idx: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = mlp_z * ((act(x w1^T + b1) * int_z) w2^T + b2), computed on the live units only; with a
    gated activation y = mlp_z * ((gate_fn(x gate_weight^T + gate_bias) * (x w1^T + b1) * int_z) w2^T + b2).

    x: [..., d]; w1: [F, d]; b1: [F] or None (no bias); w2: [d, F]; b2: [d] or None; int_z: [F] or
    None (all units, gate 1); mlp_z: a one-element tensor or None; activation: "gelu" (erf, as BERT),
    "gelu_tanh" or "relu", or a gated one (``vocab.GATED_ACTIVATIONS``: "swiglu" = silu gate as Llama,
    "geglu", "geglu_tanh", "reglu"), which needs gate_weight [F, d] (and takes gate_bias [F] or None):
    Llama's MLP is ``masked_ffn(x, up_proj.weight, None, down_proj.weight, None, activation="swiglu",
    gate_weight=gate_proj.weight)``. A unit is shared by its gate and up rows and its w2 column.
    live_idx: optional int64 [L] indices of the units to compute (see the module docstring: saves
    the host sync; units not listed contribute nothing). Masks may have any float dtype (cast to
    x's). Returns [..., d] in x's dtype; differentiable w.r.t. every tensor argument.
    """
    op = OP
    check_tensor(op, "x", x, ndim=tuple(range(1, 9)))
    check_tensor(op, "w1", w1, ndim=2, like=x, like_name="x")
    F_, d = w1.shape
    if x.shape[-1] != d:
        raise ValueError(f"cofi.ops.{op}: x must have last dim d={d} (w1 is [F, d] = {tuple(w1.shape)}), got shape {tuple(x.shape)}")
    gated = activation in GATED_ACTIVATIONS
    if not gated and (gate_weight is not None or gate_bias is not None):
        raise UserError(f"cofi.ops.{op}: gate_weight / gate_bias need a gated activation "
                        f"({', '.join(GATED_ACTIVATIONS)}), got activation={activation!r}")
    if gated:
        if gate_weight is None:
            raise UserError(f"cofi.ops.{op}: activation={activation!r} needs gate_weight [F, d] = [{F_}, {d}], got None")
        check_tensor(op, "gate_weight", gate_weight, shape=(F_, d), like=x, like_name="x")
        gate_bias = _bias(op, "gate_bias", gate_bias, F_, x)
    b1 = _bias(op, "b1", b1, F_, x)
    check_tensor(op, "w2", w2, shape=(d, F_), like=x, like_name="x")
    b2 = _bias(op, "b2", b2, d, x)
    if int_z is not None:
        check_tensor(op, "int_z", int_z, shape=(F_,), device=x.device)
        int_z = int_z.to(x.dtype)
    if mlp_z is not None:
        check_tensor(op, "mlp_z", mlp_z, device=x.device)
        if mlp_z.numel() != 1:
            raise ValueError(f"cofi.ops.{op}: mlp_z must have exactly one element, got shape {tuple(mlp_z.shape)}")
        mlp_z = mlp_z.to(x.dtype).reshape(())
    if live_idx is not None:
        check_tensor(op, "live_idx", live_idx, ndim=1, dtypes=(torch.int64,), device=x.device)
        if live_idx.shape[0] > F_:
            raise ValueError(f"cofi.ops.{op}: live_idx must list at most F={F_} units, got {live_idx.shape[0]}")
        if live_idx.device.type == "cpu" and live_idx.numel() and has_data(live_idx):  # no sync on the host
            lo, hi = (int(v) for v in torch.aminmax(live_idx))
            if lo < 0 or hi >= F_:
                raise ValueError(f"cofi.ops.{op}: live_idx must index units in [0, {F_}), got values in [{lo}, {hi}]")
    if activation not in ACT_CODES and not gated:
        raise ValueError(f"cofi.ops.{op}: activation must be one of {ACTIVATIONS + tuple(GATED_ACTIVATIONS)}, "
                         f"got {activation!r}")
    lead = x.shape[:-1]
    if gated:  # torch.ops.cofi.masked_ffn_gated: registered by cofi.ops.masked_ffn_gated (imported by cofi.ops)
        y, _ = torch.ops.cofi.masked_ffn_gated(x.reshape(-1, d), gate_weight, gate_bias, w1, b1, w2, b2, int_z, mlp_z,
                                               live_idx, GATE_FUNCTIONS.index(GATED_ACTIVATIONS[activation]),
                                               B.choice(backend))
        return y.reshape(*lead, d)
    y, _ = torch.ops.cofi.masked_ffn(x.reshape(-1, d), w1, b1, w2, b2, int_z, mlp_z, live_idx,
                                     ACT_CODES[activation], B.choice(backend))
    return y.reshape(*lead, d)


def _bias(op: str, name: str, b: torch.Tensor | None, n: int, x: torch.Tensor) -> torch.Tensor:
    """A checked [n] bias, or zeros for None (a layer without bias, as Llama's MLP)."""
    if b is None:
        return x.new_zeros(n)
    check_tensor(op, name, b, shape=(n,), like=x, like_name="x")
    return b


# ============================== native fakes ======================================================

if _ext.native_loaded():
    try:
        @torch.library.register_fake("cofi::masked_ffn_fwd_native")
        def _(x, w1, b1, w2, b2, int_z, mlp_z, live, activation):
            n_live = live.shape[0] if live is not None else w1.shape[0]
            return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], n_live)

        @torch.library.register_fake("cofi::masked_ffn_bwd_native")
        def _(grad, x, w1, b1, w2, b2, int_z, mlp_z, live, h, activation, needs):
            ins = (x, w1, b1, w2, b2, int_z, mlp_z)
            return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and n)
                    else grad.new_empty(0) for t, n in zip(ins, needs)]
    except RuntimeError:  # pragma: no cover - extension built before this op existed
        pass


__all__ = ["masked_ffn", "masked_ffn_ref", "live_units"]
