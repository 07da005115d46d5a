"""cofi.ops: fused CoFi ops as PyTorch custom ops (``torch.ops.cofi.*``) with three backends.

See ``cofi.ops.backends()`` for what this install can run and ``cofi.ops.last_backend(op)`` for
what ran. ``cofi.ops.use_backend(name)`` and ``COFI_BACKEND=name`` force a backend.
"""
from . import _backends
from ._backends import BackendError, backend_stats, last_backend, reset_stats, use_backend
from ._report import backends
from .hard_concrete import (
    expected_size,
    hard_concrete_deterministic,
    hard_concrete_keep_prob,
    hard_concrete_sample,
)

__all__ = [
    "BackendError",
    "backend_stats",
    "backends",
    "expected_size",
    "hard_concrete_deterministic",
    "hard_concrete_keep_prob",
    "hard_concrete_sample",
    "last_backend",
    "reset_stats",
    "use_backend",
]

# Ops added by their own modules; each import registers the op's backends.
try:  # noqa: SIM105 - modules land one by one
    from .masked_attention import masked_attention  # noqa: F401

    __all__.append("masked_attention")
except ImportError as _e:  # pragma: no cover
    if "masked_attention" not in str(_e):
        raise
try:
    from .masked_ffn import masked_ffn  # noqa: F401

    __all__.append("masked_ffn")
except ImportError as _e:  # pragma: no cover
    if "masked_ffn" not in str(_e):
        raise
try:
    from .masked_layer_norm import masked_layer_norm  # noqa: F401

    __all__.append("masked_layer_norm")
except ImportError as _e:  # pragma: no cover
    if "masked_layer_norm" not in str(_e):
        raise
