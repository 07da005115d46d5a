"""The three cofi ops the compact runtime calls, behind one alias.

The public ops (``cofi.ops.masked_attention`` etc.) are used when their modules exist; until then
(and for ``impl="torch"``, which ONNX export needs because exporters do not know cofi custom ops) the
plain-PyTorch references in ``cofi.ops.reference`` compute the same math. The runtime always calls
them without masks: ``head_z=None``, no ``int_z``/``mlp_z``, ``hidden_z=None``.
"""
from __future__ import annotations

import os

import torch

from ..ops.reference import masked_attention_ref, masked_ffn_ref, masked_layer_norm_ref

try:
    from ..ops.masked_attention import masked_attention_packed as _attn_public
except ImportError:  # module not landed yet
    _attn_public = None
try:
    from ..ops.masked_ffn import masked_ffn as _ffn_public
except ImportError:
    _ffn_public = None
try:
    from ..ops.masked_layer_norm import masked_layer_norm as _ln_public
except ImportError:
    _ln_public = None

IMPLS = ("cofi", "torch")


def _backend() -> str | None:
    """None (the ops resolve argument > use_backend context > COFI_BACKEND > auto) in eager mode.
    Under torch.compile the context variable cannot be traced (graph break), so pass the env
    choice or 'auto' explicitly there."""
    if torch.compiler.is_compiling():
        return os.environ.get("COFI_BACKEND") or "auto"
    return None


def public_ops_available() -> dict[str, bool]:
    """Which public cofi ops exist in this checkout (False = the reference is used for impl='cofi')."""
    return {"masked_attention": _attn_public is not None, "masked_ffn": _ffn_public is not None,
            "masked_layer_norm": _ln_public is not None}


def attention(qkv: torch.Tensor, key_padding_mask: torch.Tensor | None, impl: str = "cofi") -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + padding) v from a fused projection qkv [B, S, 3, H, D];
    key_padding_mask: [B, S] bool (True = keep) or None. Returns [B, H, S, D]."""
    if impl == "cofi" and _attn_public is not None:
        return _attn_public(qkv, None, key_padding_mask, backend=_backend())
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return masked_attention_ref(q, k, v, None, key_padding_mask)


def ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
        activation: str, impl: str = "cofi") -> torch.Tensor:
    """act(x w1^T + b1) w2^T + b2. x: [..., d]; w1: [F, d]; w2: [d, F]. Returns [..., d]."""
    if impl == "cofi" and _ffn_public is not None:
        return _ffn_public(x, w1, b1, w2, b2, None, None, activation, backend=_backend())
    return masked_ffn_ref(x, w1, b1, w2, b2, None, None, activation)


def layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
               bias: torch.Tensor, eps: float, impl: str = "cofi",
               hidden_z: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(x + residual) with affine. x, residual: [..., d]. Returns [..., d].
    hidden_z: None, or [d] 1/0 with 0 at zero padding dims (left out of the statistics, output 0)."""
    if impl == "cofi" and _ln_public is not None:
        return _ln_public(x, residual, weight, bias, hidden_z, eps, backend=_backend())
    return masked_layer_norm_ref(x, residual, weight, bias, hidden_z, eps)
