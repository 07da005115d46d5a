"""``MaskedMultiHeadAttention``: fused QKV projection over live heads + cofi.ops.masked_attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.masked_attention import masked_attention


class MaskedMultiHeadAttention(nn.Module):
    """Multi-head self-attention with a per-head gate and a per-instance head count (may be 0).

    Parameters: ``qkv`` (Linear hidden -> 3 * num_heads * head_dim, rows ordered [3, H, head_dim])
    and ``out_proj`` (Linear num_heads * head_dim -> hidden). ``forward(x, head_z, attention_mask)``:
    x [B, S, hidden]; head_z [num_heads] gate or None; attention_mask [B, S] (nonzero / True = keep).
    Heads whose gate is exactly 0 are dropped from both projections before the matmuls (one host
    sync to read the live-head list, skipped under torch.compile where every head is projected and
    the op skips the dead ones). ``prune_heads(keep)`` removes heads physically (runtime models).
    Returns [B, S, hidden].
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if head_dim is None:
            if num_heads <= 0 or hidden_size % num_heads:
                raise ValueError(f"MaskedMultiHeadAttention: give head_dim, or num_heads ({num_heads}) must divide "
                                 f"hidden_size ({hidden_size})")
            head_dim = hidden_size // num_heads
        self.hidden_size, self.num_heads, self.head_dim, self.dropout = hidden_size, num_heads, head_dim, dropout
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **kw)

    def _weights(self, live: torch.Tensor | None):
        H, Dh, d = self.num_heads, self.head_dim, self.hidden_size
        w, b = self.qkv.weight, self.qkv.bias
        wo = self.out_proj.weight
        if live is None:
            return w, b, wo, H
        L = live.numel()
        w = w.view(3, H, Dh, d).index_select(1, live).reshape(3 * L * Dh, d)
        b = b.view(3, H, Dh).index_select(1, live).reshape(-1) if b is not None else None
        wo = wo.view(d, H, Dh).index_select(1, live).reshape(d, L * Dh)
        return w, b, wo, L

    def forward(self, x: torch.Tensor, head_z: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                backend: str | None = None) -> torch.Tensor:
        Bsz, S, _ = x.shape
        live = None
        if head_z is not None and not torch.compiler.is_compiling():
            nz = torch.nonzero(head_z).flatten()
            if nz.numel() < self.num_heads:
                live = nz
        w, b, wo, L = self._weights(live)
        if L == 0:
            y = x.new_zeros(Bsz, S, self.hidden_size)
            return y + self.out_proj.bias if self.out_proj.bias is not None else y
        z = head_z.index_select(0, live) if live is not None else head_z
        qkv = F.linear(x, w, b).view(Bsz, S, 3, L, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # strided views, no copy
        p = self.dropout if self.training else 0.0
        o = masked_attention(q, k, v, z, attention_mask, dropout_p=p, generator=generator, backend=backend)
        return F.linear(o.transpose(1, 2).reshape(Bsz, S, L * self.head_dim), wo, self.out_proj.bias)

    @torch.no_grad()
    def prune_heads(self, keep: torch.Tensor) -> None:
        """Keep only heads where ``keep`` [num_heads] (bool) is True; the head count may become 0."""
        if keep.shape != (self.num_heads,):
            raise ValueError(f"prune_heads: keep must have shape ({self.num_heads},), got {tuple(keep.shape)}")
        live = torch.nonzero(keep).flatten().to(self.qkv.weight.device)
        w, b, wo, L = self._weights(live)
        self.qkv.weight = nn.Parameter(w.clone())
        if b is not None:
            self.qkv.bias = nn.Parameter(b.clone())
        self.out_proj.weight = nn.Parameter(wo.clone())
        self.qkv.out_features, self.out_proj.in_features = w.shape[0], wo.shape[1]
        self.num_heads = L

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, head_dim={self.head_dim}, dropout={self.dropout}"
