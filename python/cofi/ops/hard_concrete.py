"""Hard-concrete (L0) mask ops: sampling, keep probability, deterministic masks, expected size.

Public API (all registered as ``torch.ops.cofi.*`` custom ops with fake and autograd kernels):

- ``hard_concrete_sample(log_alpha, ...)``: z = clip(sigmoid((logit(u) + log_alpha) / T) (r - l) + l, 0, 1)
  for every element of a model's flat log_alpha buffer in one call; d log_alpha in backward
  (zero where z is clipped). Noise u ~ U(eps, 1 - eps) is drawn on log_alpha's device from
  ``generator`` (never through the host), or passed explicitly as ``noise``.
- ``hard_concrete_keep_prob(log_alpha, ...)``: 1 - Q(0), the expected-L0 score, with gradient.
- ``hard_concrete_deterministic(log_alpha, mode)``: the reference's evaluation rule per row.
- ``expected_size(...)``: expected remaining prunable parameters and expected sparsity.
- ``hard_concrete_step(log_alpha, offsets, ...)``: one training step's mask work in ONE op: z, keep
  probabilities, expected size and sparsity of a flat multi-group buffer; one backward for all.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import torch

from .. import _ext
from . import _backends as B
from ._autocast import policy_dtype
from ._validate import check_float, check_finite, check_int, check_tensor
from .reference.hard_concrete import (
    EPS,
    LIMIT_L,
    LIMIT_R,
    TEMPERATURE,
    expected_size_ref,
    hard_concrete_deterministic_ref,
    hard_concrete_keep_prob_ref,
    hard_concrete_sample_ref,
)
from ..vocab import GROUPS, group_shapes

_FLOATS = (torch.float32, torch.float64)
_GPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE_DTYPES = {"cpu": _FLOATS, "cuda": _FLOATS}
_TRITON_DTYPES = {"cpu": _FLOATS, "cuda": _FLOATS}
_REF_DTYPES = {"cpu": _GPU_FLOATS, "cuda": _GPU_FLOATS}


def _native_reasons(native_op: str):
    def reasons(x: torch.Tensor, *rest: object) -> list[str]:
        return B.native_reasons(x.device, native_op) + B.dtype_reasons("log_alpha", x, _NATIVE_DTYPES)

    return reasons


def _triton_reasons(x: torch.Tensor, *rest: object) -> list[str]:
    return B.triton_reasons(x.device) + B.dtype_reasons("log_alpha", x, _TRITON_DTYPES)


def _ref_reasons(x: torch.Tensor, *rest: object) -> list[str]:
    return B.dtype_reasons("log_alpha", x, _REF_DTYPES)


def _triton():
    import cofi_kernels.hard_concrete as k  # lazy: importing triton costs ~1 s

    return k


# ============================== hard_concrete_sample ==============================================

def _sample_bwd_ref(grad: torch.Tensor, log_alpha: torch.Tensor, u: torch.Tensor, t: float, l: float, r: float) -> torch.Tensor:
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / t)
    sbar = s * (r - l) + l
    inside = (sbar > 0) & (sbar < 1)
    return torch.where(inside, grad * (r - l) * s * (1 - s) / t, torch.zeros_like(grad))


B.register("hard_concrete_sample", B.BackendImpl(
    "reference", _ref_reasons, hard_concrete_sample_ref, _sample_bwd_ref))
B.register("hard_concrete_sample", B.BackendImpl(
    "native", _native_reasons("hard_concrete_sample_fwd_native"),
    lambda *a: torch.ops.cofi.hard_concrete_sample_fwd_native(*a),
    lambda *a: torch.ops.cofi.hard_concrete_sample_bwd_native(*a)))
B.register("hard_concrete_sample", B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().hard_concrete_sample_fwd_triton(*a),
    lambda *a: _triton().hard_concrete_sample_bwd_triton(*a)))


@torch.library.custom_op("cofi::hard_concrete_sample", mutates_args=())
def _sample_op(log_alpha: torch.Tensor, u: torch.Tensor, temperature: float, limit_l: float,
               limit_r: float, backend: str) -> torch.Tensor:
    return B.run("hard_concrete_sample", backend, "fwd", log_alpha.contiguous(), u.contiguous(),
                 temperature, limit_l, limit_r)


@_sample_op.register_fake
def _(log_alpha, u, temperature, limit_l, limit_r, backend):
    torch._check(u.shape == log_alpha.shape, lambda: "u must have log_alpha's shape")
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


@torch.library.custom_op("cofi::hard_concrete_sample_backward", mutates_args=())
def _sample_bwd_op(grad: torch.Tensor, log_alpha: torch.Tensor, u: torch.Tensor, temperature: float,
                   limit_l: float, limit_r: float, backend: str) -> torch.Tensor:
    return B.run("hard_concrete_sample", backend, "bwd", grad.contiguous(), log_alpha.contiguous(),
                 u.contiguous(), temperature, limit_l, limit_r)


@_sample_bwd_op.register_fake
def _(grad, log_alpha, u, temperature, limit_l, limit_r, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


def _sample_setup(ctx, inputs, output):
    log_alpha, u, t, l, r, backend = inputs
    ctx.save_for_backward(log_alpha, u)
    ctx.args = (t, l, r, backend)


def _sample_backward(ctx, grad):
    log_alpha, u = ctx.saved_tensors
    t, l, r, backend = ctx.args
    g = None
    if ctx.needs_input_grad[0]:
        g = torch.ops.cofi.hard_concrete_sample_backward(grad, log_alpha, u, t, l, r, backend)
    return g, None, None, None, None, None


_sample_op.register_autograd(_sample_backward, setup_context=_sample_setup)


def _check_stretch(op: str, temperature: float, limit_l: float, limit_r: float) -> None:
    check_float(op, "temperature", temperature, 0.0, open_lo=True)
    check_float(op, "limit_l", limit_l, hi=0.0, open_hi=True)
    check_float(op, "limit_r", limit_r, 1.0, open_lo=True)


def _check_gate_args(op: str, flat: torch.Tensor, temperature: float, limit_l: float, limit_r: float,
                     eps: float) -> None:
    check_finite(op, "log_alpha", flat)
    _check_stretch(op, temperature, limit_l, limit_r)
    check_float(op, "eps", eps, 0.0, 0.5, open_lo=True)


def _noise(op: str, flat: torch.Tensor, eps: float, generator: torch.Generator | None,
           noise: torch.Tensor | None) -> torch.Tensor:
    """The uniform noise u: ``noise`` (checked against log_alpha) or u ~ U(eps, 1 - eps) drawn on
    log_alpha's device from ``generator`` (never through the host)."""
    if noise is not None:
        return check_tensor(op, "noise", noise, shape=tuple(flat.shape), like=flat, like_name="log_alpha")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"cofi.ops.{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    u = torch.rand(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
    return u * (1.0 - 2.0 * eps) + eps


def _check_sizes(op: str, *sizes: int) -> tuple[int, int, int, int]:
    """(num_layers, hidden_size, num_heads, intermediate_size) as ints, each required positive."""
    names = ("num_layers", "hidden_size", "num_heads", "intermediate_size")
    return tuple(check_int(op, n, v, lo=1) for n, v in zip(names, sizes))  # type: ignore[return-value]


def hard_concrete_sample(
    log_alpha: torch.Tensor | Sequence[torch.Tensor],
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    eps: float = EPS,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Sample hard-concrete gates z in [0, 1] (exact 0 and 1 possible) for every log_alpha element.

    log_alpha: a tensor of any shape (typically a model's flat buffer of all mask groups), or a
    sequence of group tensors (then concatenated, sampled in one launch, and returned as a list of
    views of one flat z). noise: optional uniform u of log_alpha's shape; default draws
    u ~ U(eps, 1 - eps) on log_alpha's device from ``generator``. Returns z like log_alpha.
    """
    op = "hard_concrete_sample"
    groups = None
    if not isinstance(log_alpha, torch.Tensor):
        groups = list(log_alpha)
        if not groups:
            raise ValueError(f"cofi.ops.{op}: log_alpha must be a tensor or a non-empty sequence of tensors")
        for i, g in enumerate(groups):
            check_tensor(op, f"log_alpha[{i}]", g, like=groups[0], like_name="log_alpha[0]")
        flat = torch.cat([g.reshape(-1) for g in groups])
    else:
        flat = check_tensor(op, "log_alpha", log_alpha)
    _check_gate_args(op, flat, temperature, limit_l, limit_r, eps)
    u = _noise(op, flat, eps, generator, noise)
    z = torch.ops.cofi.hard_concrete_sample(flat, u, float(temperature), float(limit_l), float(limit_r), B.choice(backend))
    if groups is None:
        return z
    return list(torch.split(z, [g.numel() for g in groups]))


# ============================== hard_concrete_keep_prob ===========================================

def _q0_logit(t: float, l: float, r: float) -> float:
    xn = (0.0 - l) / (r - l)
    return (math.log(xn) - math.log1p(-xn)) * t


def _keep_prob_bwd_ref(grad, log_alpha, t, l, r, eps):
    q = torch.sigmoid(_q0_logit(t, l, r) - log_alpha)
    inside = (q > eps) & (q < 1.0 - eps)
    return torch.where(inside, grad * q * (1 - q), torch.zeros_like(grad))


B.register("hard_concrete_keep_prob", B.BackendImpl(
    "reference", _ref_reasons, hard_concrete_keep_prob_ref, _keep_prob_bwd_ref))
B.register("hard_concrete_keep_prob", B.BackendImpl(
    "native", _native_reasons("hard_concrete_keep_prob_fwd_native"),
    lambda *a: torch.ops.cofi.hard_concrete_keep_prob_fwd_native(*a),
    lambda *a: torch.ops.cofi.hard_concrete_keep_prob_bwd_native(*a)))
B.register("hard_concrete_keep_prob", B.BackendImpl(
    "triton", _triton_reasons,
    lambda *a: _triton().hard_concrete_keep_prob_fwd_triton(*a),
    lambda *a: _triton().hard_concrete_keep_prob_bwd_triton(*a)))


@torch.library.custom_op("cofi::hard_concrete_keep_prob", mutates_args=())
def _keep_op(log_alpha: torch.Tensor, temperature: float, limit_l: float, limit_r: float, eps: float,
             backend: str) -> torch.Tensor:
    return B.run("hard_concrete_keep_prob", backend, "fwd", log_alpha.contiguous(), temperature, limit_l, limit_r, eps)


@_keep_op.register_fake
def _(log_alpha, temperature, limit_l, limit_r, eps, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


@torch.library.custom_op("cofi::hard_concrete_keep_prob_backward", mutates_args=())
def _keep_bwd_op(grad: torch.Tensor, log_alpha: torch.Tensor, temperature: float, limit_l: float,
                 limit_r: float, eps: float, backend: str) -> torch.Tensor:
    return B.run("hard_concrete_keep_prob", backend, "bwd", grad.contiguous(), log_alpha.contiguous(),
                 temperature, limit_l, limit_r, eps)


@_keep_bwd_op.register_fake
def _(grad, log_alpha, temperature, limit_l, limit_r, eps, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


def _keep_setup(ctx, inputs, output):
    log_alpha, t, l, r, eps, backend = inputs
    ctx.save_for_backward(log_alpha)
    ctx.args = (t, l, r, eps, backend)


def _keep_backward(ctx, grad):
    (log_alpha,) = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = torch.ops.cofi.hard_concrete_keep_prob_backward(grad, log_alpha, *ctx.args)
    return g, None, None, None, None, None


_keep_op.register_autograd(_keep_backward, setup_context=_keep_setup)


def hard_concrete_keep_prob(
    log_alpha: torch.Tensor,
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    eps: float = EPS,
    backend: str | None = None,
) -> torch.Tensor:
    """P(z != 0) = 1 - clamp(sigmoid(logit(-l / (r - l)) T - log_alpha), eps, 1 - eps), elementwise.

    log_alpha: any shape. Returns a tensor of its shape; differentiable (zero gradient where the
    clamp is active).
    """
    op = "hard_concrete_keep_prob"
    check_tensor(op, "log_alpha", log_alpha)
    _check_gate_args(op, log_alpha, temperature, limit_l, limit_r, eps)
    return torch.ops.cofi.hard_concrete_keep_prob(log_alpha, float(temperature), float(limit_l), float(limit_r),
                                                  float(eps), B.choice(backend))


# ============================== hard_concrete_deterministic =======================================

def _det_ref(log_alpha, binary, t, l, r, eps):
    return hard_concrete_deterministic_ref(log_alpha, "binary" if binary else "soft", t, l, r, eps)


B.register("hard_concrete_deterministic", B.BackendImpl("reference", _ref_reasons, _det_ref))
B.register("hard_concrete_deterministic", B.BackendImpl(
    "native", _native_reasons("hard_concrete_deterministic_native"),
    lambda *a: torch.ops.cofi.hard_concrete_deterministic_native(*a)))
B.register("hard_concrete_deterministic", B.BackendImpl(
    "triton", _triton_reasons, lambda *a: _triton().hard_concrete_deterministic_triton(*a)))


@torch.library.custom_op("cofi::hard_concrete_deterministic", mutates_args=())
def _det_op(log_alpha: torch.Tensor, binary: bool, temperature: float, limit_l: float, limit_r: float,
            eps: float, backend: str) -> torch.Tensor:
    return B.run("hard_concrete_deterministic", backend, "fwd", log_alpha.contiguous(), binary, temperature,
                 limit_l, limit_r, eps)


@_det_op.register_fake
def _(log_alpha, binary, temperature, limit_l, limit_r, eps, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


def hard_concrete_deterministic(
    log_alpha: torch.Tensor,
    mode: str = "soft",
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    eps: float = EPS,
    backend: str | None = None,
) -> torch.Tensor:
    """The reference's evaluation mask, per row.

    log_alpha: [n] (one row), [rows, n], or 0-dim (a single layer gate). Per row the
    round(n - sum(keep_prob)) entries with the smallest log_alpha are zeroed (round half to even,
    like Python's round and torch.round; ties broken by lower index first); survivors keep
    sigmoid(0.8 log_alpha / T) in mode "soft" (the reference) or 1 in mode "binary".
    Not differentiable. Returns a tensor of log_alpha's shape.
    """
    op = "hard_concrete_deterministic"
    check_tensor(op, "log_alpha", log_alpha, ndim=(0, 1, 2))
    check_finite(op, "log_alpha", log_alpha)
    if mode not in ("soft", "binary"):
        raise ValueError(f"cofi.ops.{op}: mode must be 'soft' or 'binary', got {mode!r}")
    _check_stretch(op, temperature, limit_l, limit_r)
    check_float(op, "eps", eps, 0.0, 0.5, open_lo=True)
    shape = log_alpha.shape
    rows = log_alpha.reshape(1, -1) if log_alpha.dim() < 2 else log_alpha
    out = torch.ops.cofi.hard_concrete_deterministic(rows.detach(), mode == "binary", float(temperature),
                                                     float(limit_l), float(limit_r), float(eps), B.choice(backend))
    return out.reshape(shape)


# ============================== expected_size =====================================================

def _size_consts(L: int, d: int, H: int, F: int) -> tuple[float, float, float, float]:
    """(params per (hidden dim, head) pair, params per head, params per FFN unit, full size)."""
    per_head = (4 * d * d + 4 * d) / H if H else 0.0
    per_mlp = 2 * d * F + 5 * d
    full = L * H * per_head + L * per_mlp
    return (per_head / d if d else 0.0), per_head, float(per_mlp // F) if F else 0.0, full


def _size_fwd_ref(hidden, head, mha, inter, ffn, L, d, H, F):
    return expected_size_ref(hidden, head, mha, inter, ffn, L, d, H, F)


def _size_bwd_ref(g_params, g_sparsity, hidden, head, mha, inter, ffn, L, d, H, F):
    """Closed-form gradient of expected_size_ref (custom-op bodies run below autograd)."""
    pair_head, per_head, per_unit, full = _size_consts(L, d, H, F)
    ref = next(t for t in (hidden, head, mha, inter, ffn) if t is not None)
    g_e = g_params - g_sparsity / full
    ones = lambda *s: torch.ones(*s, dtype=ref.dtype, device=ref.device)  # noqa: E731
    head_ = ones(L, H) if head is None else head
    mha_ = ones(L) if mha is None else mha
    inter_ = ones(L, F) if inter is None else inter
    ffn_ = ones(L) if ffn is None else ffn
    head_score = (mha_[:, None] * head_).sum()
    int_score = (ffn_[:, None] * inter_).sum()
    if hidden is not None:
        hsum = hidden.sum()
        d_head, d_int = hsum * pair_head, hsum * 2.0
    else:
        d_head = torch.tensor(per_head, dtype=ref.dtype, device=ref.device)
        d_int = torch.tensor(per_unit, dtype=ref.dtype, device=ref.device)
    empty = lambda: ref.new_empty(0)  # noqa: E731  (a fresh tensor each: outputs may not alias)
    return [
        empty() if hidden is None else (g_e * (head_score * pair_head + int_score * 2.0)).expand_as(hidden).clone(),
        empty() if head is None else g_e * d_head * mha_[:, None].expand_as(head).clone(),
        empty() if mha is None else g_e * d_head * head_.sum(-1),
        empty() if inter is None else g_e * d_int * ffn_[:, None].expand_as(inter).clone(),
        empty() if ffn is None else g_e * d_int * inter_.sum(-1),
    ]


def _size_reasons_native(hidden, head, mha, inter, ffn, *rest):
    ref = next(t for t in (hidden, head, mha, inter, ffn) if t is not None)
    return B.native_reasons(ref.device, "expected_size_fwd_native") + B.dtype_reasons("keep probabilities", ref, _NATIVE_DTYPES)


def _size_reasons_ref(hidden, head, mha, inter, ffn, *rest):
    ref = next(t for t in (hidden, head, mha, inter, ffn) if t is not None)
    return B.dtype_reasons("keep probabilities", ref, _REF_DTYPES)


def _size_reasons_triton(hidden, head, mha, inter, ffn, *rest):
    ref = next(t for t in (hidden, head, mha, inter, ffn) if t is not None)
    return B.triton_reasons(ref.device) + B.dtype_reasons("keep probabilities", ref, _TRITON_DTYPES)


B.register("expected_size", B.BackendImpl("reference", _size_reasons_ref, _size_fwd_ref, _size_bwd_ref))
B.register("expected_size", B.BackendImpl(
    "native", _size_reasons_native,
    lambda *a: tuple(torch.ops.cofi.expected_size_fwd_native(*a)),
    lambda *a: list(torch.ops.cofi.expected_size_bwd_native(*a))))
B.register("expected_size", B.BackendImpl(
    "triton", _size_reasons_triton,
    lambda *a: _triton().expected_size_fwd_triton(*a),
    lambda *a: _triton().expected_size_bwd_triton(*a)))


@torch.library.custom_op("cofi::expected_size", mutates_args=())
def _size_op(hidden: torch.Tensor | None, head: torch.Tensor | None, mha: torch.Tensor | None,
             intermediate: torch.Tensor | None, ffn: torch.Tensor | None, num_layers: int, hidden_size: int,
             num_heads: int, intermediate_size: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    ins = [t.contiguous() if t is not None else None for t in (hidden, head, mha, intermediate, ffn)]
    e, s = B.run("expected_size", backend, "fwd", *ins, num_layers, hidden_size, num_heads, intermediate_size)
    return e, s


@_size_op.register_fake
def _(hidden, head, mha, intermediate, ffn, num_layers, hidden_size, num_heads, intermediate_size, backend):
    ref = next(t for t in (hidden, head, mha, intermediate, ffn) if t is not None)
    return ref.new_empty(()), ref.new_empty(())


@torch.library.custom_op("cofi::expected_size_backward", mutates_args=())
def _size_bwd_op(grad_params: torch.Tensor, grad_sparsity: torch.Tensor, hidden: torch.Tensor | None,
                 head: torch.Tensor | None, mha: torch.Tensor | None, intermediate: torch.Tensor | None,
                 ffn: torch.Tensor | None, num_layers: int, hidden_size: int, num_heads: int,
                 intermediate_size: int, backend: str) -> list[torch.Tensor]:
    ins = [t.contiguous() if t is not None else None for t in (hidden, head, mha, intermediate, ffn)]
    return B.run("expected_size", backend, "bwd", grad_params.contiguous(), grad_sparsity.contiguous(), *ins,
                 num_layers, hidden_size, num_heads, intermediate_size)


@_size_bwd_op.register_fake
def _(grad_params, grad_sparsity, hidden, head, mha, intermediate, ffn, num_layers, hidden_size, num_heads,
      intermediate_size, backend):
    return [torch.empty_like(t) if t is not None else grad_params.new_empty(0) for t in (hidden, head, mha, intermediate, ffn)]


def _size_setup(ctx, inputs, output):
    *groups, L, d, H, F, backend = inputs
    ctx.present = [t is not None for t in groups]
    ctx.save_for_backward(*[t for t in groups if t is not None])
    ctx.args = (L, d, H, F, backend)


def _size_backward(ctx, g_params, g_sparsity):
    saved = iter(ctx.saved_tensors)
    groups = [next(saved) if p else None for p in ctx.present]
    ref = next(t for t in groups if t is not None)
    g_params = torch.zeros((), dtype=ref.dtype, device=ref.device) if g_params is None else g_params
    g_sparsity = torch.zeros((), dtype=ref.dtype, device=ref.device) if g_sparsity is None else g_sparsity
    grads = torch.ops.cofi.expected_size_backward(g_params, g_sparsity, *groups, *ctx.args)
    out = [g if (p and ctx.needs_input_grad[i]) else None for i, (g, p) in enumerate(zip(grads, ctx.present))]
    return (*out, None, None, None, None, None)


_size_op.register_autograd(_size_backward, setup_context=_size_setup)


def expected_size(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    hidden: torch.Tensor | None = None,
    head: torch.Tensor | None = None,
    mha: torch.Tensor | None = None,
    intermediate: torch.Tensor | None = None,
    ffn: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected remaining prunable parameters and expected sparsity (CoFi's formula, any sizes).

    Keep probabilities per group: hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L]
    (None = group not pruned, counted as all-kept). Returns two 0-dim tensors
    (expected_params, expected_sparsity), differentiable w.r.t. every group given. For BERT-base
    the full prunable size is 85,017,600.
    """
    op = "expected_size"
    L, d, H, F = _check_sizes(op, num_layers, hidden_size, num_heads, intermediate_size)
    given = {"hidden": hidden, "head": head, "mha": mha, "intermediate": intermediate, "ffn": ffn}
    groups = {g: (given[g], shape) for g, shape in group_shapes(L, d, H, F).items()}
    present = [(n, t) for n, (t, _) in groups.items() if t is not None]
    if not present:
        raise ValueError(f"cofi.ops.{op}: at least one group of keep probabilities is required")
    first_name, first = present[0]
    for n, (t, shape) in groups.items():
        if t is not None:
            check_tensor(op, n, t, shape=shape, like=first, like_name=first_name)
    return torch.ops.cofi.expected_size(hidden, head, mha, intermediate, ffn, L, d, H, F, B.choice(backend))


# ============================== hard_concrete_step ================================================
# Sample + keep-prob + expected size of a flat buffer of mask groups as ONE custom op with ONE
# backward: a CoFi step's mask work costs one op call each way instead of six (the per-call overhead,
# not the arithmetic, dominates at BERT size: ~38k gates).

STEP_GROUPS = GROUPS  # cofi.vocab: the canonical group order, which the native op's arguments follow


def _step_shapes(L: int, d: int, H: int, F: int) -> tuple[tuple[int, ...], ...]:
    shapes = group_shapes(L, d, H, F)
    return tuple(shapes[g] for g in STEP_GROUPS)


def _step_views(flat: torch.Tensor, offsets: Sequence[int], L: int, d: int, H: int, F: int) -> list[torch.Tensor | None]:
    out = []
    for off, shape in zip(offsets, _step_shapes(L, d, H, F)):
        n = math.prod(shape)
        out.append(None if off < 0 else flat[off:off + n].view(shape))
    return out


def _composite_step(backend: str):
    """fwd/bwd of hard_concrete_step composed from ``backend``'s sample, keep-prob and size kernels."""
    sample, keep, size = (B.impl(op, backend) for op in ("hard_concrete_sample", "hard_concrete_keep_prob", "expected_size"))

    def fwd(la, u, offsets, L, d, H, F, t, l, r, eps):
        z, p = sample.fwd(la, u, t, l, r), keep.fwd(la, t, l, r, eps)
        e, s = size.fwd(*_step_views(p, offsets, L, d, H, F), L, d, H, F)
        return z, p, e, s

    def bwd(gz, gk, gp, gs, la, u, z, p, offsets, L, d, H, F, t, l, r, eps):
        gsize = size.bwd(gp, gs, *_step_views(p, offsets, L, d, H, F), L, d, H, F)
        gk = torch.zeros_like(la) if gk is None else gk.clone()
        for off, g in zip(offsets, gsize):
            if off >= 0:
                gk[off:off + g.numel()] += g.reshape(-1)
        gz = torch.zeros_like(la) if gz is None else gz
        return sample.bwd(gz, la, u, t, l, r) + keep.bwd(gk, la, t, l, r, eps)

    return fwd, bwd


def _on_first_tensor(reasons):
    """Backend reasons for hard_concrete_step's fwd (log_alpha, ...) and bwd (grad_z or None, ...) calls:
    judged on the first tensor argument (all of one dtype and device)."""
    return lambda *args: reasons(next(x for x in args if isinstance(x, torch.Tensor)))


for _name, _why in (("reference", _ref_reasons), ("triton", _triton_reasons)):
    _f, _b = _composite_step(_name)
    B.register("hard_concrete_step", B.BackendImpl(_name, _on_first_tensor(_why), _f, _b))
B.register("hard_concrete_step", B.BackendImpl(
    "native", _on_first_tensor(_native_reasons("hard_concrete_step_fwd_native")),
    lambda *a: tuple(torch.ops.cofi.hard_concrete_step_fwd_native(*a)),
    lambda *a: torch.ops.cofi.hard_concrete_step_bwd_native(*a)))


@torch.library.custom_op("cofi::hard_concrete_step", mutates_args=())
def _step_op(log_alpha: torch.Tensor, u: torch.Tensor, offsets: list[int], num_layers: int, hidden_size: int,
             num_heads: int, intermediate_size: int, temperature: float, limit_l: float, limit_r: float, eps: float,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z, p, e, s = B.run("hard_concrete_step", backend, "fwd", log_alpha.contiguous(), u.contiguous(), offsets,
                       num_layers, hidden_size, num_heads, intermediate_size, temperature, limit_l, limit_r, eps)
    return z, p, e, s


def _step_fake(log_alpha, u, offsets, num_layers, hidden_size, num_heads, intermediate_size, temperature, limit_l,
               limit_r, eps, *backend):
    z = torch.empty_like(log_alpha, memory_format=torch.contiguous_format)
    return z, torch.empty_like(z), log_alpha.new_empty(()), log_alpha.new_empty(())


_step_op.register_fake(_step_fake)


@torch.library.custom_op("cofi::hard_concrete_step_backward", mutates_args=())
def _step_bwd_op(grad_z: torch.Tensor | None, grad_keep: torch.Tensor | None, grad_params: torch.Tensor,
                 grad_sparsity: torch.Tensor, log_alpha: torch.Tensor, u: torch.Tensor, z: torch.Tensor,
                 keep: torch.Tensor, offsets: list[int], num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int,
                 temperature: float, limit_l: float, limit_r: float, eps: float, backend: str) -> torch.Tensor:
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    return B.run("hard_concrete_step", backend, "bwd", c(grad_z), c(grad_keep), grad_params.contiguous(),
                 grad_sparsity.contiguous(), log_alpha.contiguous(), u.contiguous(), z.contiguous(), keep.contiguous(),
                 offsets,
                 num_layers, hidden_size, num_heads, intermediate_size, temperature, limit_l, limit_r, eps)


@_step_bwd_op.register_fake
def _(grad_z, grad_keep, grad_params, grad_sparsity, log_alpha, u, z, keep, offsets, num_layers, hidden_size, num_heads,
      intermediate_size, temperature, limit_l, limit_r, eps, backend):
    return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)


def _step_setup(ctx, inputs, output):
    log_alpha, u, *args = inputs
    ctx.save_for_backward(log_alpha, u, output[0], output[1])
    ctx.args = args


def _step_backward(ctx, gz, gk, gp, gs):
    if not ctx.needs_input_grad[0]:
        return (None,) * 12
    log_alpha, u, z, keep = ctx.saved_tensors
    zero = lambda g: torch.zeros((), dtype=log_alpha.dtype, device=log_alpha.device) if g is None else g  # noqa: E731
    g = torch.ops.cofi.hard_concrete_step_backward(gz, gk, zero(gp), zero(gs), log_alpha, u, z, keep, *ctx.args)
    return (g,) + (None,) * 11


_step_op.register_autograd(_step_backward, setup_context=_step_setup)


class HardConcreteStep(NamedTuple):
    """z: sampled gates, keep: P(z != 0), both [n] like log_alpha; expected_params,
    expected_sparsity: 0-dim. All differentiable w.r.t. log_alpha through one backward op."""

    z: torch.Tensor
    keep: torch.Tensor
    expected_params: torch.Tensor
    expected_sparsity: torch.Tensor


def hard_concrete_step(
    log_alpha: torch.Tensor,
    offsets: Mapping[str, int],
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    eps: float = EPS,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> HardConcreteStep:
    """One training step's mask work: ``hard_concrete_sample`` + ``hard_concrete_keep_prob`` of every
    element of a flat log_alpha buffer, and ``expected_size`` of the groups in it, in one op.

    log_alpha: [n], float. offsets: start offset in log_alpha of each group present, from
    ``STEP_GROUPS`` = hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L] (row-major;
    absent groups count as all-kept). Elements outside every group are sampled but not sized.
    noise / generator / eps as in ``hard_concrete_sample``. Returns ``HardConcreteStep``.
    """
    op = "hard_concrete_step"
    flat = check_tensor(op, "log_alpha", log_alpha, ndim=(1,))
    _check_gate_args(op, flat, temperature, limit_l, limit_r, eps)
    L, d, H, F = _check_sizes(op, num_layers, hidden_size, num_heads, intermediate_size)
    if not isinstance(offsets, Mapping):
        raise TypeError(f"cofi.ops.{op}: offsets must be a mapping {{group: start offset}}, got {type(offsets).__name__}")
    unknown = set(offsets) - set(STEP_GROUPS)
    if unknown:
        raise ValueError(f"cofi.ops.{op}: offsets has unknown groups {sorted(unknown)}; groups are {STEP_GROUPS}")
    if not offsets:
        raise ValueError(f"cofi.ops.{op}: offsets must name at least one group of {STEP_GROUPS}")
    offs = [check_int(op, f"offsets[{g!r}]", offsets[g], lo=0) if g in offsets else -1 for g in STEP_GROUPS]
    spans = []
    for g, off, shape in zip(STEP_GROUPS, offs, _step_shapes(L, d, H, F)):
        if g not in offsets:
            continue
        n = math.prod(shape)
        if off < 0 or off + n > flat.numel():
            raise ValueError(f"cofi.ops.{op}: group {g} of {n} elements at offset {off} does not fit log_alpha "
                             f"of {flat.numel()} elements")
        spans.append((off, off + n, g))
    spans.sort()
    for (a0, a1, ga), (b0, b1, gb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"cofi.ops.{op}: groups {ga} [{a0}, {a1}) and {gb} [{b0}, {b1}) overlap")
    u = _noise(op, flat, eps, generator, noise)
    args = (offs, L, d, H, F, float(temperature), float(limit_l), float(limit_r), float(eps))
    chosen = B.choice(backend)
    # The fast path skips the custom op, so only where its autocast policy would not cast (fp32 / fp64).
    if not torch.compiler.is_compiling() and chosen in ("auto", "native") and flat.device.type in ("cpu", "cuda") and \
            policy_dtype("hard_concrete_step", flat) == flat.dtype == u.dtype and \
            B.resolve("hard_concrete_step", chosen, flat, u).name == "native":
        return HardConcreteStep(*_NativeStep.apply(flat, u, args))
    return HardConcreteStep(*torch.ops.cofi.hard_concrete_step(flat, u, *args, chosen))


class _NativeStep(torch.autograd.Function):
    """Eager fast path of cofi::hard_concrete_step on the native backend: the same C++ kernels called
    directly, without the custom op's Python dispatch layers (which cost more than the kernels at
    BERT size). torch.compile and opcheck go through the custom op."""

    @staticmethod
    def forward(ctx, log_alpha, u, args):
        z, keep, e, s = torch.ops.cofi.hard_concrete_step_fwd_native(log_alpha.detach(), u, *args)
        B.record("hard_concrete_step", "native", log_alpha.device)
        ctx.save_for_backward(log_alpha, u, z, keep)
        ctx.args = args
        return z, keep, e, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, gk, gp, gs):
        log_alpha, u, z, keep = ctx.saved_tensors
        zero = lambda g: torch.zeros((), dtype=log_alpha.dtype, device=log_alpha.device) if g is None else g  # noqa: E731
        g = torch.ops.cofi.hard_concrete_step_bwd_native(gz, gk, zero(gp), zero(gs), log_alpha, u, z, keep, *ctx.args)
        B.record("hard_concrete_step", "native", log_alpha.device)
        return g, None, None


# ============================== native fakes ======================================================

if _ext.native_loaded():
    @torch.library.register_fake("cofi::hard_concrete_sample_fwd_native")
    def _(log_alpha, u, temperature, limit_l, limit_r):
        return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cofi::hard_concrete_sample_bwd_native")
    def _(grad, log_alpha, u, temperature, limit_l, limit_r):
        return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cofi::hard_concrete_keep_prob_fwd_native")
    def _(log_alpha, temperature, limit_l, limit_r, eps):
        return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cofi::hard_concrete_keep_prob_bwd_native")
    def _(grad, log_alpha, temperature, limit_l, limit_r, eps):
        return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cofi::hard_concrete_deterministic_native")
    def _(log_alpha, binary, temperature, limit_l, limit_r, eps):
        return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cofi::expected_size_fwd_native")
    def _(hidden, head, mha, intermediate, ffn, L, d, H, F):
        ref = next(t for t in (hidden, head, mha, intermediate, ffn) if t is not None)
        return ref.new_empty(()), ref.new_empty(())

    torch.library.register_fake("cofi::hard_concrete_step_fwd_native")(_step_fake)

    @torch.library.register_fake("cofi::hard_concrete_step_bwd_native")
    def _(grad_z, grad_keep, grad_params, grad_sparsity, log_alpha, u, z, keep, offsets, L, d, H, F, t, l, r, eps):
        return torch.empty_like(log_alpha, memory_format=torch.contiguous_format)

    @torch.library.register_fake("cofi::expected_size_bwd_native")
    def _(g_params, g_sparsity, hidden, head, mha, intermediate, ffn, L, d, H, F):
        return [torch.empty_like(t) if t is not None else g_params.new_empty(0)
                for t in (hidden, head, mha, intermediate, ffn)]


__all__ = [
    "STEP_GROUPS",
    "HardConcreteStep",
    "expected_size",
    "hard_concrete_deterministic",
    "hard_concrete_keep_prob",
    "hard_concrete_sample",
    "hard_concrete_step",
]
