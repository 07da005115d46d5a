"""cofi.ops: fused CoFi ops as PyTorch custom ops (``torch.ops.cofi.*``) with three backends.

See ``cofi.ops.backends()`` for what this install can run and ``cofi.ops.last_backend(op)`` for
what ran. ``cofi.ops.use_backend(name)`` and ``COFI_BACKEND=name`` force a backend. Under
``torch.autocast`` each op follows the policy in ``cofi.ops._autocast``.
"""
from . import _backends
from ._backends import BackendError, backend_stats, last_backend, reset_stats, use_backend
from ._report import backends
from .hard_concrete import (
    expected_size,
    hard_concrete_deterministic,
    hard_concrete_keep_prob,
    hard_concrete_sample,
    hard_concrete_step,
)
from .masked_attention import masked_attention, masked_attention_packed
from .masked_ffn import masked_ffn
from . import masked_ffn_gated  # noqa: F401 (registers torch.ops.cofi.masked_ffn_gated)
from .masked_layer_norm import masked_layer_norm
from .masked_rms_norm import masked_add_rms_norm, masked_rms_norm
from . import _autocast

_autocast.install()  # autocast policies of the ops above (docs/ops-inputs.md, "Autocast")

__all__ = [
    "BackendError",
    "backend_stats",
    "backends",
    "expected_size",
    "hard_concrete_deterministic",
    "hard_concrete_keep_prob",
    "hard_concrete_sample",
    "hard_concrete_step",
    "last_backend",
    "masked_add_rms_norm",
    "masked_attention",
    "masked_attention_packed",
    "masked_ffn",
    "masked_layer_norm",
    "masked_rms_norm",
    "reset_stats",
    "use_backend",
]

