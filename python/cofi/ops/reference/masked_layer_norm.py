"""Reference hidden-masked LayerNorm with fused residual add (eager PyTorch)."""
from __future__ import annotations

import torch


def masked_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    hidden_z: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """LayerNorm of v = x * hidden_z + residual over the kept dims (hidden_z != 0), affine,
    then times hidden_z; pruned dims give 0.

    x, residual: [..., d]; weight, bias, hidden_z: [d]. Returns [..., d].
    With hidden_z None this is LayerNorm(x + residual).
    """
    v = x if hidden_z is None else x * hidden_z.to(x.dtype)
    if residual is not None:
        v = v + residual
    if hidden_z is None:
        return torch.nn.functional.layer_norm(v, (v.shape[-1],), weight, bias, eps)
    keep = (hidden_z != 0).to(v.dtype)
    n = keep.sum().clamp_min(1)
    mean = (v * keep).sum(-1, keepdim=True) / n
    cen = (v - mean) * keep
    var = (cen * cen).sum(-1, keepdim=True) / n
    y = cen * torch.rsqrt(var + eps) * weight + bias
    return y * hidden_z.to(v.dtype)
