"""``MaskedFFN``: BERT-style feed-forward block (intermediate + output dense) on cofi.ops.masked_ffn."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.masked_ffn import masked_ffn


class MaskedFFN(nn.Module):
    """y = mlp_z * ((act(x W1^T + b1) * int_z) W2^T + b2); units with int_z == 0 cost nothing.

    hidden_size d, intermediate_size F (0 allowed: a fully pruned FFN of the compact runtime).
    Parameters: w1 [F, d], b1 [F], w2 [d, F], b2 [d] (nn.Linear layouts of BERT's
    intermediate.dense and output.dense). forward(x [..., d], int_z [F] | None, mlp_z scalar | None,
    live_idx int64 [L] | None) -> [..., d]; see cofi.ops.masked_ffn for live_idx (no host sync).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "gelu",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.hidden_size, self.intermediate_size, self.activation = hidden_size, intermediate_size, activation
        self.w1 = nn.Parameter(torch.empty(intermediate_size, hidden_size, **kw))
        self.b1 = nn.Parameter(torch.empty(intermediate_size, **kw))
        self.w2 = nn.Parameter(torch.empty(hidden_size, intermediate_size, **kw))
        self.b2 = nn.Parameter(torch.empty(hidden_size, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            if w.numel():
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1 / math.sqrt(w.shape[1]) if w.shape[1] else 0.0
            nn.init.uniform_(b, -bound, bound)

    @classmethod
    def from_linears(cls, intermediate: nn.Linear, output: nn.Linear, activation: str = "gelu") -> "MaskedFFN":
        """Build from BERT's intermediate.dense and output.dense (weights copied)."""
        m = cls(intermediate.in_features, intermediate.out_features, activation,
                device=intermediate.weight.device, dtype=intermediate.weight.dtype)
        with torch.no_grad():
            m.w1.copy_(intermediate.weight), m.b1.copy_(intermediate.bias)
            m.w2.copy_(output.weight), m.b2.copy_(output.bias)
        return m

    def forward(self, x: torch.Tensor, int_z: torch.Tensor | None = None, mlp_z: torch.Tensor | None = None,
                live_idx: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        return masked_ffn(x, self.w1, self.b1, self.w2, self.b2, int_z, mlp_z, self.activation, backend=backend,
                          live_idx=live_idx)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, activation={self.activation!r}"
