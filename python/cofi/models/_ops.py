"""The ops the models call, in one place.

compact / unmasked paths: the public fused ops (``cofi.ops.masked_attention`` / ``masked_ffn`` /
``masked_layer_norm``, backend chosen by cofi's dispatch). ``backend="dense"``: the plain-PyTorch
references of the same ops (``cofi.ops.reference``): dense GEMMs with the masks multiplied at the
CoFi reference's points, i.e. the reference's method, kept for checking and benchmarking.
"""
from __future__ import annotations

from ..ops import masked_attention, masked_ffn, masked_layer_norm
from ..ops.reference import masked_attention_ref, masked_ffn_ref, masked_layer_norm_ref

__all__ = ["masked_attention", "masked_attention_ref", "masked_ffn", "masked_ffn_ref", "masked_layer_norm",
           "masked_layer_norm_ref"]
