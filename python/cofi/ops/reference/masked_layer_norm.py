"""Reference hidden-masked LayerNorm with fused residual add (eager PyTorch)."""
from __future__ import annotations

import torch


def row_stats(v: torch.Tensor, keep: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the kept dims of each row of v [N, d]: (mean [N], var [N]).

    Corrected two-pass: the residuals c of the first mean correct both statistics
    (mean += sum(c) / n, var = (sum(c^2) - sum(c)^2 / n) / n), so a row that is constant over its
    kept dims gets its value back exactly and normalises to exactly 0, as torch.layer_norm does,
    instead of rounding noise amplified by 1 / sqrt(eps). The native kernels do the same.
    """
    mean0 = (v * keep).sum(-1) / n
    c = (v - mean0[..., None]) * keep
    s1 = c.sum(-1)
    corr = s1 / n
    var = ((c * c).sum(-1) - s1 * corr) / n
    return mean0 + corr, var.clamp_min(0)


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
    mean, var = row_stats(v, keep, n)
    cen = (v - mean[..., None]) * keep
    y = cen * torch.rsqrt(var[..., None] + eps) * weight + bias
    return y * hidden_z.to(v.dtype)
