"""Mask configuration: which groups are pruned, their shapes, hard-concrete constants, init means."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..vocab import GROUPS, group_shape

# log_alpha init means per group.
# "reference" reproduces princeton-nlp/CoFiPruning (models/l0_module.py:reset_loga): every mask at
#   mean 10 except the intermediate (FFN-unit) masks, which fall back to the droprate formula
#   log(1 - 0.5) - log(0.5) = 0. The maintainer called that asymmetry "mostly a typo" (issue #51), but
#   the published numbers were produced with it, so it is our default: at init the FFN units are kept
#   with probability 0.832 (sampled z ~ half of them soft) and the expected sparsity of BERT-base
#   starts at ~0.117 instead of ~0.
# "uniform" puts every group at 10 (Sheared-LLaMA uses 5 everywhere): a clean start at sparsity ~0.
# The clamp to [log 1e-2, log 1e2] runs after every optimiser step (MaskSet.clamp_), as in the
# reference, so a mean of 10 acts as 4.605 from the second step on; we do NOT clamp at init, so
# step 0 samples from the same distribution as the reference's step 0.
INIT_PRESETS: dict[str, dict[str, float]] = {
    "reference": {"hidden": 10.0, "head": 10.0, "mha": 10.0, "intermediate": 0.0, "ffn": 10.0},
    "uniform": {"hidden": 10.0, "head": 10.0, "mha": 10.0, "intermediate": 10.0, "ffn": 10.0},
}


@dataclass(frozen=True)
class MaskConfig:
    """Shapes and constants of a CoFi mask set for an encoder with ``num_layers`` layers.

    Group shapes: hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L].
    ``init_mean`` is a preset name from ``INIT_PRESETS`` or a dict per group (missing groups use the
    droprate formula log(1 - droprate_init) - log(droprate_init)).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    groups: tuple[str, ...] = GROUPS
    init_mean: dict[str, float] | str = "reference"
    init_std: float = 0.01
    temperature: float = 2.0 / 3.0
    limit_l: float = -0.1
    limit_r: float = 1.1
    eps: float = 1e-6
    droprate_init: float = 0.5
    clamp: tuple[float, float] = (math.log(1e-2), math.log(1e2))
    _means: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for n in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
            if int(getattr(self, n)) <= 0:
                raise ValueError(f"cofi.masks.MaskConfig: {n} must be positive, got {getattr(self, n)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"cofi.masks.MaskConfig: hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        groups = tuple(self.groups)
        bad = [g for g in groups if g not in GROUPS]
        if bad or len(set(groups)) != len(groups) or not groups:
            raise ValueError(f"cofi.masks.MaskConfig: groups must be a non-empty subset of {GROUPS}, got {groups}")
        object.__setattr__(self, "groups", tuple(g for g in GROUPS if g in groups))  # canonical order
        if not 0.0 < self.droprate_init < 1.0:
            raise ValueError(f"cofi.masks.MaskConfig: droprate_init must be in (0, 1), got {self.droprate_init}")
        default = math.log(1 - self.droprate_init) - math.log(self.droprate_init)
        if isinstance(self.init_mean, str):
            if self.init_mean not in INIT_PRESETS:
                raise ValueError(f"cofi.masks.MaskConfig: init_mean must be one of {sorted(INIT_PRESETS)} or a dict, got {self.init_mean!r}")
            means = dict(INIT_PRESETS[self.init_mean])
        else:
            unknown = set(self.init_mean) - set(GROUPS)
            if unknown:
                raise ValueError(f"cofi.masks.MaskConfig: init_mean has unknown groups {sorted(unknown)}")
            means = {g: float(self.init_mean.get(g, default)) for g in GROUPS}
        self._means.update(means)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def mean(self, group: str) -> float:
        """Init mean of ``group``'s log_alpha."""
        return self._means[group]

    @property
    def score_travel(self) -> float:
        """How far (in log_alpha) a score may have to move: from where the highest-starting group
        sits after the first clamp (its init mean, at most the top of ``clamp``) to the bottom of
        ``clamp``, where a unit is kept with probability ~0.05. Only the pruned ``groups`` count."""
        lo, hi = self.clamp
        return max(min(self._means[g], hi) for g in self.groups) - lo

    def shape(self, group: str) -> tuple[int, ...]:
        """Shape of ``group``'s mask: hidden (d,), head (L, H), mha (L,), intermediate (L, F), ffn (L,)."""
        return group_shape(group, self.num_layers, self.hidden_size, self.num_heads, self.intermediate_size)

    def numel(self, group: str) -> int:
        return math.prod(self.shape(group))

    @classmethod
    def from_hf_config(cls, config: object, **kw: object) -> "MaskConfig":
        """Mask config for a transformers BertConfig / RobertaConfig (or anything with the same fields)."""
        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   num_heads=config.num_attention_heads, intermediate_size=config.intermediate_size, **kw)
