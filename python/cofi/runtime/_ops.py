"""The three cofi ops the compact runtime's per-op paths call.

Backend ``"ops"``: the public cofi ops (``cofi.ops.masked_attention`` etc., their own backend choice);
``"torch"`` (ONNX export needs it: exporters do not know cofi custom ops): the plain-PyTorch
references in ``cofi.ops.reference``, the same math in aten ops. The runtime always calls them
without masks: ``head_z=None``, no ``int_z``/``mlp_z``, ``hidden_z`` only for zero padding dims.
"""
from __future__ import annotations

import os

import torch

from ..ops.masked_attention import masked_attention_packed
from ..ops.masked_ffn import masked_ffn
from ..ops.masked_layer_norm import masked_layer_norm
from ..ops.reference import masked_attention_ref, masked_ffn_ref, masked_layer_norm_ref

PER_OP_BACKENDS = ("ops", "torch")


def _op_backend() -> str | None:
    """None (the ops resolve argument > use_backend context > COFI_BACKEND > auto) in eager mode.
    Under torch.compile the context variable cannot be traced (graph break), so pass the env
    choice or 'auto' explicitly there."""
    if torch.compiler.is_compiling():
        return os.environ.get("COFI_BACKEND") or "auto"
    return None


def attention(qkv: torch.Tensor, key_padding_mask: torch.Tensor | None, backend: str = "ops") -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + padding) v from a fused projection qkv [B, S, 3, H, D];
    key_padding_mask: [B, S] bool (True = keep) or None. Returns [B, H, S, D]."""
    if backend == "ops":
        return masked_attention_packed(qkv, None, key_padding_mask, backend=_op_backend())
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return masked_attention_ref(q, k, v, None, key_padding_mask)


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        activation: str, backend: str = "ops") -> torch.Tensor:
    """act(x w1^T + b1) w2^T + b2. x: [..., d]; w1: [F, d]; w2: [d, F]. Returns [..., d]."""
    if backend == "ops":
        return masked_ffn(x, w1, b1, w2, b2, None, None, activation, backend=_op_backend())
    return masked_ffn_ref(x, w1, b1, w2, b2, None, None, activation)


def layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor, eps: float, backend: str = "ops",
               hidden_z: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(x + residual) with affine. x, residual: [..., d]. Returns [..., d].
    hidden_z: None, or [d] 1/0 with 0 at zero padding dims (left out of the statistics, output 0)."""
    if backend == "ops":
        return masked_layer_norm(x, residual, weight, bias, hidden_z, eps, backend=_op_backend())
    return masked_layer_norm_ref(x, residual, weight, bias, hidden_z, eps)
