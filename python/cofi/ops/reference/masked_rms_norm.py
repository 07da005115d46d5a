"""Reference hidden-masked RMSNorm with optional fused residual add (eager PyTorch)."""
from __future__ import annotations

import torch


def masked_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    hidden_z: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm of s = x * hidden_z + residual over the kept dims (hidden_z != 0), times weight,
    then times hidden_z; pruned dims give 0.

    x, residual: [..., d]; weight, hidden_z: [d]. Returns [..., d]:
    y = s * k / sqrt(sum(s^2 k) / n + eps) * weight * hidden_z, k = (hidden_z != 0), n = max(sum k, 1).
    With hidden_z None this is ``torch.nn.functional.rms_norm(x + residual, (d,), weight, eps)``.
    Dropping the pruned dims of x, residual and weight gives exactly the stock RMSNorm of the
    smaller hidden size (with hidden_z's kept values folded into weight).
    """
    return masked_add_rms_norm_ref(x, residual, weight, hidden_z, eps)[0]


def masked_add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    hidden_z: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, s): ``masked_rms_norm_ref``'s output and the sum s = x * hidden_z + residual [..., d]
    it normalised (a pre-norm decoder's next residual stream)."""
    s = x if hidden_z is None else x * hidden_z.to(x.dtype)
    if residual is not None:
        s = s + residual
    if hidden_z is None:
        return torch.nn.functional.rms_norm(s, (s.shape[-1],), weight, eps), s
    keep = (hidden_z != 0).to(s.dtype)
    n = keep.sum().clamp_min(1)
    ms = (s * s * keep).sum(-1, keepdim=True) / n
    y = s * keep * torch.rsqrt(ms + eps) * weight * hidden_z.to(s.dtype)
    return y, s
