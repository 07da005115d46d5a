"""``MaskedLayerNorm``: LayerNorm with fused residual add and hidden-dim mask on cofi.ops.masked_layer_norm."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.masked_layer_norm import masked_layer_norm


class MaskedLayerNorm(nn.Module):
    """y = LayerNorm(x * hidden_z + residual) over kept dims (hidden_z != 0), affine, times hidden_z.

    Parameters weight, bias: [d] (names as nn.LayerNorm, so state dicts load directly).
    forward(x [..., d], residual like x | None, hidden_z [d] | None) -> [..., d].
    """

    def __init__(self, hidden_size: int, eps: float = 1e-12, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> "MaskedLayerNorm":
        m = cls(ln.normalized_shape[0], ln.eps, device=ln.weight.device, dtype=ln.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(ln.weight), m.bias.copy_(ln.bias)
        return m

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, hidden_z: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
        return masked_layer_norm(x, residual, self.weight, self.bias, hidden_z, self.eps, backend=backend)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.eps}"
