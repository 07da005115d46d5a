"""cofi.masks: CoFi's hard-concrete mask groups, expected and real size, Lagrangian, deterministic masks.

``MaskSet`` holds every group of a model in one flat log_alpha parameter; ``Masks`` carries one
step's mask values into the models (``cofi.models``).
"""
from .config import GROUPS, INIT_PRESETS, MaskConfig
from .masks import Masks
from .maskset import MaskSet, MaskStep, TargetArchitecture
from .projection import project_to_shape, project_to_sparsity
from .sparsity import encoder_full_size, expected_full_size, full_size, kept_units, real_size, real_sparsity

__all__ = [
    "GROUPS", "INIT_PRESETS", "MaskConfig", "MaskSet", "MaskStep", "Masks", "TargetArchitecture",
    "encoder_full_size", "expected_full_size", "full_size", "kept_units", "project_to_shape", "project_to_sparsity", "real_size", "real_sparsity",
]
