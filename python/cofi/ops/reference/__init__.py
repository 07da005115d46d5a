"""Plain-PyTorch references of every cofi op: the ground truth the kernels are tested against.

Each function is differentiable with ordinary autograd and exact in float64.
"""
from .hard_concrete import (
    expected_size_ref,
    hard_concrete_deterministic_ref,
    hard_concrete_keep_prob_ref,
    hard_concrete_sample_ref,
)
from .masked_attention import masked_attention_ref
from .masked_ffn import masked_ffn_gated_ref, masked_ffn_ref
from .masked_layer_norm import masked_layer_norm_ref
from .masked_rms_norm import masked_add_rms_norm_ref, masked_rms_norm_ref

__all__ = [
    "expected_size_ref",
    "hard_concrete_deterministic_ref",
    "hard_concrete_keep_prob_ref",
    "hard_concrete_sample_ref",
    "masked_add_rms_norm_ref",
    "masked_attention_ref",
    "masked_ffn_gated_ref",
    "masked_ffn_ref",
    "masked_layer_norm_ref",
    "masked_rms_norm_ref",
]
