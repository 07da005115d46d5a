"""cofi.masks: CoFi's hard-concrete mask groups, expected and real size, Lagrangian, deterministic masks.

``MaskSet`` holds every group of a model in one flat log_alpha parameter; ``Masks`` carries one
step's mask values into the models (``cofi.models``).
"""
from .config import GROUPS, INIT_PRESETS, MaskConfig
from .masks import Masks
from .maskset import MaskSet, MaskStep, TargetArchitecture
from .sparsity import expected_full_size, full_size, kept_units, real_size, real_sparsity

__all__ = [
    "GROUPS", "INIT_PRESETS", "MaskConfig", "MaskSet", "MaskStep", "Masks", "TargetArchitecture",
    "expected_full_size", "full_size", "kept_units", "real_size", "real_sparsity",
]
