"""``DecoderMaskSet``: the hard-concrete masks of a Llama-family decoder (groups ``cofi.vocab.DECODER_GROUPS``:
hidden [d], head [L, H], kv [L, G], mha [L], intermediate [L, F], ffn [L]) in ONE flat log_alpha
parameter, with the interface the trainer's ``Optimizers`` use (``log_alpha``, ``lambda_1``,
``lambda_2``, ``ascend_lambdas_``, ``clamp_``) and a Lagrangian to

* a sparsity target: ``s = 1 - E[body] / body`` (body = the decoder's non-embedding parameters,
  ``cofi.masks.decoder.expected_size``, as Sheared-LLaMA counts), ``L_c = l1 (s - t) + l2 (s - t)^2``;
* a target shape (``DecoderTarget``: layers, query heads, K/V heads, intermediate, hidden, uniform
  across layers as Sheared-LLaMA): per constrained group and row the expected sparsity of the row
  against the target's, each with its own lambdas (``MaskSet``'s target-architecture rule).

Delivery (``cofi.masks.decoder_projection``): exactly the target shape, or the largest structure
whose real sparsity is >= the target (closest from below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from ..errors import UserError
from ..vocab import DECODER_GROUPS, decoder_attention_params, decoder_mlp_params
from .decoder import DecoderMasks, DecoderShape, expected_size, full_size, real_size

_LAYER_GATES = ("mha", "ffn")


@dataclass(frozen=True)
class DecoderMaskConfig:
    """Which decoder groups are pruned and the hard-concrete constants. ``init_mean``: log_alpha
    mean of every group (Sheared-LLaMA: 5; the clamp to [log 1e-2, log 1e2] applies after each step)."""

    shape: DecoderShape
    groups: tuple[str, ...] = DECODER_GROUPS
    init_mean: float = 5.0
    init_std: float = 0.01
    temperature: float = 2.0 / 3.0
    limit_l: float = -0.1
    limit_r: float = 1.1
    eps: float = 1e-6
    clamp: tuple[float, float] = (math.log(1e-2), math.log(1e2))

    def __post_init__(self) -> None:
        bad = [g for g in self.groups if g not in DECODER_GROUPS]
        if bad or not self.groups or len(set(self.groups)) != len(self.groups):
            raise UserError(f"cofi.masks.DecoderMaskConfig: groups must be a non-empty subset of {DECODER_GROUPS}, "
                            f"got {tuple(self.groups)}")
        object.__setattr__(self, "groups", tuple(g for g in DECODER_GROUPS if g in self.groups))

    @property
    def score_travel(self) -> float:
        """How far (in log_alpha) a score may have to move, as ``cofi.masks.MaskConfig.score_travel``:
        from the init mean after the first clamp (at most the top of ``clamp``) to the bottom of
        ``clamp``, where a unit is kept with probability ~0.05 (9.21 for the default mean 5)."""
        lo, hi = self.clamp
        return min(self.init_mean, hi) - lo


@dataclass(frozen=True)
class DecoderTarget:
    """A target shape, the same in every layer (so the fold is a stock Llama). None = free.
    hidden_size -> "hidden"; num_heads -> "head" (per layer); num_kv_heads -> "kv" (per layer;
    the delivered heads are num_heads / num_kv_heads per kept group); intermediate_size ->
    "intermediate" (per layer); num_layers -> "mha" and "ffn" (a layer keeps both or neither)."""

    num_layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None

    def group_counts(self, s: DecoderShape) -> dict[str, int]:
        """Kept units per row of every constrained group; a target the model cannot have is one UserError line."""
        who = "cofi.masks.DecoderTarget"
        full = {"num_layers": s.num_layers, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
                "num_kv_heads": s.num_kv_heads, "intermediate_size": s.intermediate_size}
        for name, n in full.items():
            v = getattr(self, name)
            if v is not None and not 1 <= int(v) <= n:
                raise UserError(f"{who}: {name} must be in [1, {n}], got {v}")
        q = self.num_heads if self.num_heads is not None else s.num_heads
        k = self.num_kv_heads if self.num_kv_heads is not None else s.num_kv_heads
        if (self.num_heads is None) != (self.num_kv_heads is None):
            raise UserError(f"{who}: give num_heads and num_kv_heads together, got num_heads={self.num_heads}, "
                            f"num_kv_heads={self.num_kv_heads}")
        if self.num_heads is not None and (q % k or q // k > s.group_size):
            raise UserError(f"{who}: num_heads must be a multiple of num_kv_heads with at most {s.group_size} "
                            f"query heads per K/V head (the model's groups), got {q} heads, {k} K/V heads")
        out = {"hidden": self.hidden_size, "head": self.num_heads, "kv": self.num_kv_heads,
               "intermediate": self.intermediate_size, "mha": self.num_layers, "ffn": self.num_layers}
        counts = {g: int(v) for g, v in out.items() if v is not None}
        if not counts:
            raise UserError(f"{who}: give at least one of {sorted(full)}")
        return counts

    def body_params(self, s: DecoderShape) -> int:
        """Non-embedding parameters of the target model (``real_size``'s body, free fields at full size)."""
        c = self.group_counts(s)
        d, L = c.get("hidden", s.hidden_size), c.get("mha", s.num_layers)
        q, k, f = c.get("head", s.num_heads), c.get("kv", s.num_kv_heads), c.get("intermediate", s.intermediate_size)
        return d + L * (decoder_attention_params(d, q, k, s.head_dim, s.qkv_bias, s.o_bias)
                        + decoder_mlp_params(d, f, s.mlp_bias))


class DecoderMaskStep(NamedTuple):
    """``DecoderMaskSet.step()``: sampled gates z and keep probabilities (views of flat [n]),
    expected body parameters and expected sparsity (0-dim, differentiable)."""

    z: DecoderMasks
    keep: DecoderMasks
    expected_params: torch.Tensor
    expected_sparsity: torch.Tensor


class DecoderMaskSet(nn.Module):
    """The L0 module of a decoder (module docstring). ``target``: a ``DecoderTarget`` (target-shape
    mode, one lambda pair per constrained group in ``target_groups`` order) or None (sparsity mode)."""

    def __init__(self, cfg: DecoderMaskConfig, target: DecoderTarget | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg, self.shape = cfg, cfg.shape
        self.offsets: dict[str, tuple[int, int]] = {}
        o = 0
        for g in cfg.groups:
            n = math.prod(self.shape.shape(g))
            self.offsets[g] = (o, o + n)
            o += n
        self.log_alpha = nn.Parameter(torch.empty(o, dtype=dtype, device=device))
        self.target = target
        self.target_counts: dict[str, int] = (
            {g: n for g, n in target.group_counts(self.shape).items() if g in cfg.groups} if target else {})
        if target is not None and not self.target_counts:
            raise UserError(f"cofi.masks.DecoderMaskSet: the target constrains no pruned group ({cfg.groups})")
        self.target_groups = tuple(self.target_counts)
        lam = (len(self.target_groups),) if target is not None else ()
        self.lambda_1 = nn.Parameter(torch.zeros(lam, dtype=dtype, device=device))
        self.lambda_2 = nn.Parameter(torch.zeros(lam, dtype=dtype, device=device))
        self.full_body = full_size(self.shape)["body"]
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.log_alpha.normal_(self.cfg.init_mean, self.cfg.init_std, generator=generator)
            self.lambda_1.zero_()
            self.lambda_2.zero_()

    def group_view(self, flat: torch.Tensor, group: str) -> torch.Tensor:
        a, b = self.offsets[group]
        return flat[a:b].view(self.shape.shape(group))

    def masks_from_flat(self, flat: torch.Tensor) -> DecoderMasks:
        """DecoderMasks whose pruned groups are views of ``flat`` (the others None: all ones)."""
        return DecoderMasks(**{g: self.group_view(flat, g) for g in self.cfg.groups})

    def _hc(self) -> tuple[float, float, float, float]:
        c = self.cfg
        return c.temperature, c.limit_l, c.limit_r, c.eps

    # ------------------------------------------------------------------ masks
    def keep_prob(self) -> DecoderMasks:
        """P(z != 0) per element (differentiable)."""
        return self.masks_from_flat(ops.hard_concrete_keep_prob(self.log_alpha, *self._hc()))

    def step(self, generator: torch.Generator | None = None) -> DecoderMaskStep:
        """A training step's masks: sampled z, keep probabilities, expected body size and sparsity."""
        t, l, r, eps = self._hc()
        z = ops.hard_concrete_sample(self.log_alpha, t, l, r, eps, generator=generator)
        keep = self.keep_prob()
        params, s = self.expected_sparsity(keep)
        return DecoderMaskStep(self.masks_from_flat(z), keep, params, s)

    def expected_sparsity(self, keep: DecoderMasks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected body parameters, 1 - that / full body)."""
        keep = self.keep_prob() if keep is None else keep
        body = expected_size(keep, self.shape)["body"]
        return body, 1.0 - body / self.full_body

    def deterministic(self, mode: str = "soft") -> DecoderMasks:
        """Evaluation masks (no gradient): per row (hidden one row, head / kv / intermediate per layer,
        each layer gate alone) the reference's rule ``cofi.ops.hard_concrete_deterministic``."""
        out = {}
        la_all = self.log_alpha.detach()
        for g in self.cfg.groups:
            la = self.group_view(la_all, g)
            rows = la.reshape(-1, 1) if g in _LAYER_GATES else la
            out[g] = ops.hard_concrete_deterministic(rows, mode, *self._hc()).reshape(la.shape)
        return DecoderMasks(**out)

    def real_sparsity(self, masks: DecoderMasks) -> float:
        """1 - body parameters of the folded model / full body."""
        return 1.0 - real_size(masks, self.shape)["body"] / self.full_body

    # ------------------------------------------------------------------ constraint
    @property
    def target_sparsity(self) -> float | None:
        """Target-shape mode: the sparsity of the target shape (exact count)."""
        return None if self.target is None else 1.0 - self.target.body_params(self.shape) / self.full_body

    def lagrangian(self, target: float | None = None, *, progress: float = 1.0,
                   step: DecoderMaskStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_c, expected sparsity). Sparsity mode: ``target`` (already ramped). Target-shape mode:
        each constrained row's expected sparsity against ``progress`` x its target's."""
        if step is None:
            keep = self.keep_prob()
            _, s = self.expected_sparsity(keep)
        else:
            keep, s = step.keep, step.expected_sparsity
        if self.target is None:
            if target is None:
                raise ValueError("cofi.masks.DecoderMaskSet.lagrangian: target must be given (no target shape)")
            d = s - float(target)
            return self.lambda_1 * d + self.lambda_2 * d * d, s
        loss = s.new_zeros(())
        for i, g in enumerate(self.target_groups):
            k = getattr(keep, g)
            rows = k.reshape(1, -1) if k.dim() == 1 else k
            n = rows.shape[-1]
            d = (1.0 - rows.sum(-1) / n) - (1.0 - self.target_counts[g] / n) * float(progress)
            loss = loss + (self.lambda_1[i] * d + self.lambda_2[i] * d * d).mean()
        return loss, s

    def ascend_lambdas_(self) -> None:
        """Lambdas are maximised: negate their gradients before the optimiser step."""
        for p in (self.lambda_1, self.lambda_2):
            if p.grad is not None:
                p.grad.neg_()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(*self.cfg.clamp)


__all__ = ["DecoderMaskConfig", "DecoderMaskSet", "DecoderMaskStep", "DecoderTarget"]
