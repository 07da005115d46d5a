"""Reference masked feed-forward block (eager PyTorch, dense GEMMs then masks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...vocab import GATE_FUNCTIONS, GATED_ACTIVATIONS
from ...vocab import OP_ACTIVATIONS as ACTIVATIONS  # noqa: F401 (re-exported to the ops)


def activation_ref(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU (erf, as BERT), tanh-approximated GELU, ReLU, or SiLU (gates of gated FFNs only)."""
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return torch.relu(h)
    raise ValueError(f"activation: expected one of {GATE_FUNCTIONS}, got {activation!r}")


def masked_ffn_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    int_z: torch.Tensor | None = None,
    mlp_z: torch.Tensor | None = None,
    activation: str = "gelu",
) -> torch.Tensor:
    """y = mlp_z * ((act(x w1^T + b1) * int_z) w2^T + b2).

    x: [..., d]; w1: [F, d]; b1: [F]; w2: [d, F]; b2: [d]; int_z: [F] or None;
    mlp_z: scalar tensor or None. Returns [..., d].

    A unit whose int_z is exactly 0 is absent: its d int_z is 0 (the kernels never compute dead
    units; hard-concrete's clip gives zero gradient there anyway). d mlp_z is exact everywhere.
    """
    a = activation_ref(F.linear(x, w1, b1), activation)
    if int_z is not None:
        z = int_z.to(a.dtype)
        a = a * torch.where(z != 0, z, z.detach())
    y = F.linear(a, w2, b2)
    if mlp_z is not None:
        y = y * mlp_z.to(y.dtype)
    return y


def masked_ffn_gated_ref(
    x: torch.Tensor,
    wg: torch.Tensor,
    bg: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    int_z: torch.Tensor | None = None,
    mlp_z: torch.Tensor | None = None,
    activation: str = "swiglu",
) -> torch.Tensor:
    """y = mlp_z * ((gate_fn(x wg^T + bg) * (x w1^T + b1) * int_z) w2^T + b2), e.g. Llama's MLP
    ``down(silu(gate(x)) * up(x))`` with wg = gate_proj, w1 = up_proj, w2 = down_proj.

    x: [..., d]; wg, w1: [F, d]; bg, b1: [F] or None; w2: [d, F]; b2: [d] or None; int_z: [F] or None;
    mlp_z: scalar tensor or None; activation: a key of ``vocab.GATED_ACTIVATIONS``. Returns [..., d].
    Same exact-zero gate convention as ``masked_ffn_ref``.
    """
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(GATED_ACTIVATIONS)}, got {activation!r}")
    a = activation_ref(F.linear(x, wg, bg), GATED_ACTIVATIONS[activation]) * F.linear(x, w1, b1)
    if int_z is not None:
        z = int_z.to(a.dtype)
        a = a * torch.where(z != 0, z, z.detach())
    y = F.linear(a, w2, b2)
    if mlp_z is not None:
        y = y * mlp_z.to(y.dtype)
    return y
