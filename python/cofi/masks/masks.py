"""The ``Masks`` container passed to the models: one tensor (or None) per mask group."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import torch

from .config import GROUPS, MaskConfig


@dataclass
class Masks:
    """Mask values of one step: sampled z, deterministic values, keep probabilities or all ones.

    hidden [d] | None, head [L, H] | None, mha [L] | None, intermediate [L, F] | None, ffn [L] | None.
    A group that is None is not applied (equivalent to all ones).
    """

    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None
    mha: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    ffn: torch.Tensor | None = None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(group, tensor) for every group that is present, in canonical order."""
        for g in GROUPS:
            t = getattr(self, g)
            if t is not None:
                yield g, t

    def _map(self, fn) -> "Masks":
        return Masks(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name))) for f in fields(self)})

    def to(self, *args: object, **kw: object) -> "Masks":
        """Like ``Tensor.to`` on every group."""
        return self._map(lambda t: t.to(*args, **kw))

    def detach(self) -> "Masks":
        return self._map(lambda t: t.detach())

    def clone(self) -> "Masks":
        return self._map(lambda t: t.clone())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the present groups (for checkpoints)."""
        return {g: t.detach().cpu().clone() for g, t in self.items()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "Masks":
        unknown = set(sd) - set(GROUPS)
        if unknown:
            raise ValueError(f"cofi.masks.Masks.from_state_dict: unknown groups {sorted(unknown)}")
        return cls(**{g: sd[g] for g in sd})

    @classmethod
    def ones(cls, cfg: MaskConfig, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "Masks":
        """All-ones masks for every group enabled in ``cfg``."""
        return cls(**{g: torch.ones(cfg.shape(g), dtype=dtype, device=device) for g in cfg.groups})

    def binarize(self) -> "Masks":
        """1 where a value is nonzero, 0 elsewhere (same dtype)."""
        return self._map(lambda t: (t != 0).to(t.dtype))
