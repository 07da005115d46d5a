"""``MaskSet``: all hard-concrete mask groups of a model in ONE flat log_alpha parameter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from ..vocab import group_shapes
from .config import GROUPS, MaskConfig
from .masks import Masks
from .sparsity import expected_full_size, full_size, real_size, real_sparsity, reference_prunable_size

# The groups' shapes in symbols (cofi.vocab.group_shapes): hidden (d,), head (L, H), mha (L,),
# intermediate (L, F), ffn (L,). One-row groups: hidden, mha, ffn; per-layer gates: mha, ffn.
_SYMBOLIC_SHAPES = group_shapes("L", "d", "H", "F")  # type: ignore[arg-type]
_ONE_ROW = tuple(g for g in GROUPS if len(_SYMBOLIC_SHAPES[g]) == 1)
_LAYER_GATES = tuple(g for g in GROUPS if _SYMBOLIC_SHAPES[g] == ("L",))


@dataclass(frozen=True)
class TargetArchitecture:
    """Sheared-LLaMA-style targeted pruning: a target shape instead of a global sparsity.

    hidden_size -> group "hidden"; num_heads (per layer) -> "head"; intermediate_size (per layer)
    -> "intermediate"; num_layers -> both "mha" and "ffn". None = no constraint on that group.
    """

    hidden_size: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None

    def group_targets(self, cfg: MaskConfig) -> dict[str, int]:
        """Target number of kept units per row, for every constrained group present in ``cfg``."""
        # a group's row size (last dim of its shape): hidden d, head H, intermediate F, mha / ffn L
        target = group_shapes(self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size)
        out = {}
        for g in GROUPS:
            t, full = target[g][-1], cfg.shape(g)[-1]
            if t is None or g not in cfg.groups:
                continue
            if not 0 <= int(t) <= full:
                raise ValueError(f"cofi.masks.TargetArchitecture: target for {g} must be in [0, {full}], got {t}")
            out[g] = int(t)
        if not out:
            raise ValueError("cofi.masks.TargetArchitecture: no constrained group is enabled in the mask config")
        return out

    def sizes(self, cfg: MaskConfig) -> tuple[int, int, int, int]:
        """(L, d, H, F) of the target model, unconstrained fields taken from ``cfg``."""
        return (self.num_layers if self.num_layers is not None else cfg.num_layers,
                self.hidden_size if self.hidden_size is not None else cfg.hidden_size,
                self.num_heads if self.num_heads is not None else cfg.num_heads,
                self.intermediate_size if self.intermediate_size is not None else cfg.intermediate_size)


class MaskStep(NamedTuple):
    """``MaskSet.step()``: sampled gates and keep probabilities per group (views of flat [n] tensors),
    expected remaining prunable parameters and expected sparsity (0-dim)."""

    z: Masks
    keep: Masks
    expected_params: torch.Tensor
    expected_sparsity: torch.Tensor


class MaskSet(nn.Module):
    """CoFi's L0 module: mask groups hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L].

    Parameters: ``log_alpha`` (ONE flat buffer, groups in canonical order; per-group views via
    ``log_alpha_<group>``), ``lambda_1``, ``lambda_2`` (0-dim; in target-architecture mode one entry
    per constrained group, order ``target_groups``). Lambdas are maximised: call ``ascend_lambdas_()``
    after backward (negates their gradients) and step them with an ordinary optimiser.
    """

    def __init__(self, cfg: MaskConfig, target: TargetArchitecture | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.offsets: dict[str, tuple[int, int]] = {}
        o = 0
        for g in cfg.groups:
            n = cfg.numel(g)
            self.offsets[g] = (o, o + n)
            o += n
        self.log_alpha = nn.Parameter(torch.empty(o, dtype=dtype, device=device))
        self.target = target
        self.target_counts: dict[str, int] = target.group_targets(cfg) if target is not None else {}
        self.target_groups: tuple[str, ...] = tuple(self.target_counts)
        n_lam = len(self.target_groups)
        shape = (n_lam,) if target is not None else ()
        self.lambda_1 = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.lambda_2 = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.reset_parameters()

    # ------------------------------------------------------------------ layout
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """log_alpha ~ Normal(init_mean[group], init_std) per group; lambdas 0."""
        with torch.no_grad():
            for g in self.cfg.groups:
                v = self.group_view(self.log_alpha, g)
                v.normal_(self.cfg.mean(g), self.cfg.init_std, generator=generator)
            self.lambda_1.zero_()
            self.lambda_2.zero_()

    def group_view(self, flat: torch.Tensor, group: str) -> torch.Tensor:
        """View of ``group``'s slice of a flat per-element tensor, in the group's shape."""
        a, b = self.offsets[group]
        return flat[a:b].view(self.cfg.shape(group))

    def masks_from_flat(self, flat: torch.Tensor) -> Masks:
        """Masks whose groups are views of ``flat`` (same layout as log_alpha)."""
        return Masks(**{g: self.group_view(flat, g) for g in self.cfg.groups})

    def __getattr__(self, name: str):
        if name.startswith("log_alpha_") and name[len("log_alpha_"):] in GROUPS:
            g = name[len("log_alpha_"):]
            if g not in self.cfg.groups:
                return None
            return self.group_view(self.log_alpha, g)
        return super().__getattr__(name)

    @property
    def num_masks(self) -> int:
        return self.log_alpha.numel()

    # ------------------------------------------------------------------ masks
    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> Masks:
        """Sampled z for every group in ONE fused hard_concrete_sample call (noise drawn on device)."""
        c = self.cfg
        z = ops.hard_concrete_sample(self.log_alpha, c.temperature, c.limit_l, c.limit_r, c.eps,
                                     generator=generator, noise=noise)
        return self.masks_from_flat(z)

    def step(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> "MaskStep":
        """A training step's mask work in ONE fused op (cofi.ops.hard_concrete_step): sampled z, keep
        probabilities and expected size/sparsity; pass the result on as ``lagrangian(step=...)`` so
        that the whole mask graph (gates and constraint) back-propagates through one backward op."""
        c = self.cfg
        r = ops.hard_concrete_step(self.log_alpha, {g: a for g, (a, _) in self.offsets.items()},
                                   num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads,
                                   intermediate_size=c.intermediate_size, temperature=c.temperature,
                                   limit_l=c.limit_l, limit_r=c.limit_r, eps=c.eps, generator=generator, noise=noise)
        return MaskStep(self.masks_from_flat(r.z), self.masks_from_flat(r.keep), r.expected_params, r.expected_sparsity)

    def keep_prob(self) -> Masks:
        """P(z != 0) per element (differentiable), one fused call."""
        c = self.cfg
        return self.masks_from_flat(ops.hard_concrete_keep_prob(self.log_alpha, c.temperature, c.limit_l, c.limit_r, c.eps))

    def deterministic(self, mode: str = "soft", exact_target: bool = False) -> Masks:
        """Evaluation masks (no gradient). Per row (hidden: one row; head/intermediate: per layer;
        mha/ffn: each layer gate alone) zero the round(expected #zeros) smallest log_alpha; survivors
        keep sigmoid(0.8 log_alpha / T) ("soft", the reference) or 1 ("binary").
        ``exact_target`` (target-architecture mode): exactly the target shape instead
        (``cofi.masks.projection.project_to_shape``: top-k per row by log_alpha; layers: the
        num_layers layers of highest mean gate score keep both gates), as Sheared-LLaMA's
        ``eval_target_model``."""
        if mode not in ("soft", "binary"):
            raise ValueError(f"cofi.masks.MaskSet.deterministic: mode must be 'soft' or 'binary', got {mode!r}")
        c = self.cfg
        if exact_target:
            if self.target is None:
                raise ValueError("cofi.masks.MaskSet.deterministic: exact_target needs a target architecture")
            from .projection import project_to_shape

            return project_to_shape(self, self.target_counts, mode)
        out = {}
        la_all = self.log_alpha.detach()
        for g in c.groups:
            la = self.group_view(la_all, g)
            rows = la.reshape(-1, 1) if g in _LAYER_GATES else la
            out[g] = ops.hard_concrete_deterministic(rows, mode, c.temperature, c.limit_l, c.limit_r, c.eps).reshape(la.shape)
        return Masks(**out)

    def ones(self) -> Masks:
        return Masks.ones(self.cfg, dtype=self.log_alpha.dtype, device=self.log_alpha.device)

    # ------------------------------------------------------------------ size and constraint
    def expected_sparsity(self, keep: Masks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected remaining prunable parameters, expected sparsity) via cofi.ops.expected_size."""
        keep = self.keep_prob() if keep is None else keep
        c = self.cfg
        return ops.expected_size(num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads,
                                 intermediate_size=c.intermediate_size, hidden=keep.hidden, head=keep.head,
                                 mha=keep.mha, intermediate=keep.intermediate, ffn=keep.ffn)

    @property
    def target_sparsity(self) -> float | None:
        """Target-architecture mode: the overall sparsity of the target shape (expected-size formula)."""
        if self.target is None:
            return None
        L, d, _, F = self.target.sizes(self.cfg)
        return 1.0 - reference_prunable_size(L, d, F) / expected_full_size(self.cfg)

    def group_sparsity(self, keep: Masks | None = None) -> dict[str, torch.Tensor]:
        """Expected sparsity per row of each group: 1 - sum(keep) / row size (hidden: [1]; head,
        intermediate: [L]; mha, ffn: [1], over the L gates). Sheared-LLaMA's per-mask sparsity."""
        keep = self.keep_prob() if keep is None else keep
        out = {}
        for g, k in keep.items():
            rows = k.reshape(1, -1) if g in _ONE_ROW else k
            out[g] = 1.0 - rows.sum(-1) / rows.shape[-1]
        return out

    def lagrangian(self, target: float | None = None, *, progress: float | None = None,
                   step: "MaskStep | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (L_c, expected sparsity).

        Global mode: L_c = lambda_1 (s - t) + lambda_2 (s - t)^2 with s the expected sparsity and
        t = ``target``. Target-architecture mode: per constrained group g with target sparsity t_g,
        L_c = sum_g mean_rows[lambda_1[g] (s_row - p t_g) + lambda_2[g] (s_row - p t_g)^2], p the
        warm-up progress in [0, 1]: ``progress`` if given, else target / target_sparsity (so a
        trainer ramping a global target to ``target_sparsity`` works unchanged), else 1.
        ``step``: this training step's ``step()`` result, whose keep probabilities and expected
        sparsity are used (the same numbers; no second keep-probability and size op each way).
        """
        if step is not None:
            keep, s = step.keep, step.expected_sparsity
        else:
            keep = self.keep_prob()
            _, s = self.expected_sparsity(keep)
        if self.target is None:
            if target is None:
                raise ValueError("cofi.masks.MaskSet.lagrangian: target must be given (no target architecture)")
            d = s - float(target)
            return self.lambda_1 * d + self.lambda_2 * d * d, s
        if progress is None:
            ts = self.target_sparsity
            progress = 1.0 if target is None else (min(1.0, float(target) / ts) if ts > 0 else 1.0)
        rows = self.group_sparsity(keep)
        loss = s.new_zeros(())
        for i, g in enumerate(self.target_groups):
            n = self.cfg.shape(g)[-1]  # row size (1-D groups: one row of all their elements)
            tg = (1.0 - self.target_counts[g] / n) * float(progress)
            d = rows[g] - tg
            loss = loss + (self.lambda_1[i] * d + self.lambda_2[i] * d * d).mean()
        return loss, s

    def ascend_lambdas_(self) -> None:
        """Turn the lambdas' descent gradients into ascent ones (min over model, max over lambdas)."""
        for p in (self.lambda_1, self.lambda_2):
            if p.grad is not None:
                p.grad.neg_()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp log_alpha to cfg.clamp (default [log 1e-2, log 1e2]); call after each optimiser step."""
        self.log_alpha.clamp_(*self.cfg.clamp)

    # ------------------------------------------------------------------ real size
    @property
    def full_size(self) -> int:
        """Exact prunable parameter count of the unpruned model (see cofi.masks.full_size)."""
        return full_size(self.cfg)

    def real_size(self, masks: Masks | None = None, count: str = "exact") -> int:
        return real_size(self.deterministic() if masks is None else masks, self.cfg, count)

    def real_sparsity(self, masks: Masks | None = None, count: str = "exact") -> float:
        """Sparsity of a deterministic mask set by exact count of kept parameters (default: this
        set's deterministic soft masks)."""
        return real_sparsity(self.deterministic() if masks is None else masks, self.cfg, count)
