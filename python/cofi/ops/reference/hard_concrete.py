"""Reference hard-concrete (L0) mask math, after Louizos et al. (2018) and the CoFi code.

Defaults: temperature 2/3, stretch (limit_l, limit_r) = (-0.1, 1.1), eps 1e-6.
"""
from __future__ import annotations

import math

import torch

from ...vocab import reference_ffn_layer_params, reference_head_params

TEMPERATURE = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1
EPS = 1e-6
MAGIC = 0.8  # soft-mask sharpening of the deterministic rule (asappresearch/flop, CoFi)


def hard_concrete_sample_ref(
    log_alpha: torch.Tensor,
    u: torch.Tensor,
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
) -> torch.Tensor:
    """z = clip(sigmoid((logit(u) + log_alpha) / temperature) * (r - l) + l, 0, 1).

    log_alpha, u: same shape (u uniform in (eps, 1 - eps)). Returns z of that shape.
    """
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return torch.nn.functional.hardtanh(s * (limit_r - limit_l) + limit_l, 0.0, 1.0)


def hard_concrete_keep_prob_ref(
    log_alpha: torch.Tensor,
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    eps: float = EPS,
) -> torch.Tensor:
    """P(z != 0) = 1 - Q(0), Q(0) = clamp(sigmoid(logit(-l / (r - l)) * temperature - log_alpha), eps, 1 - eps)."""
    xn = (0.0 - limit_l) / (limit_r - limit_l)
    logits = math.log(xn) - math.log1p(-xn)
    q0 = torch.sigmoid(logits * temperature - log_alpha).clamp(eps, 1.0 - eps)
    return 1.0 - q0


def hard_concrete_deterministic_ref(
    log_alpha: torch.Tensor,
    mode: str = "soft",
    temperature: float = TEMPERATURE,
    limit_l: float = LIMIT_L,
    limit_r: float = LIMIT_R,
    eps: float = EPS,
) -> torch.Tensor:
    """The reference's evaluation mask, applied per row of a 2-D log_alpha [rows, n].

    Per row: num_zeros = round(n - sum(keep_prob)) (round half to even, as Python's round);
    the num_zeros entries with the smallest log_alpha (ties: lower index first) become 0.
    Survivors keep sigmoid(log_alpha / temperature * 0.8) (mode "soft") or 1 (mode "binary").
    """
    if mode not in ("soft", "binary"):
        raise ValueError(f"mode: expected 'soft' or 'binary', got {mode!r}")
    rows, n = log_alpha.shape
    keep = hard_concrete_keep_prob_ref(log_alpha, temperature, limit_l, limit_r, eps)
    num_zeros = torch.round(n - keep.sum(-1)).to(torch.long)  # torch.round: half to even
    if mode == "soft":
        z = torch.sigmoid(log_alpha / temperature * MAGIC)
    else:
        z = torch.ones_like(log_alpha)
    order = torch.argsort(log_alpha, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=log_alpha.device).expand(rows, n).contiguous())
    return torch.where(rank < num_zeros[:, None], torch.zeros_like(z), z)


def expected_size_ref(
    hidden: torch.Tensor | None,
    head: torch.Tensor | None,
    mha: torch.Tensor | None,
    intermediate: torch.Tensor | None,
    ffn: torch.Tensor | None,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    intermediate_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected remaining prunable parameters and expected sparsity (CoFi's formula).

    Keep probabilities: hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L]; a group
    that is None counts as all-kept. With a hidden group each (hidden dim, head) pair is worth
    (4 d + 4) / H parameters and each (hidden dim, FFN unit) pair 2; without it each head is worth
    (4 d^2 + 4 d) / H and each FFN unit floor((2 d F + 5 d) / F).
    Full size M = L H (4 d^2 + 4 d) / H + L (2 d F + 5 d). Returns (expected_params, sparsity).
    """
    L, d, H, F = num_layers, hidden_size, num_heads, intermediate_size
    ref = next(t for t in (hidden, head, mha, intermediate, ffn) if t is not None)
    dt, dev = ref.dtype, ref.device
    ones = lambda *s: torch.ones(*s, dtype=dt, device=dev)  # noqa: E731
    head = ones(L, H) if head is None else head
    mha = ones(L) if mha is None else mha
    intermediate = ones(L, F) if intermediate is None else intermediate
    ffn = ones(L) if ffn is None else ffn
    params_per_head = reference_head_params(d, H)
    params_per_mlp_layer = reference_ffn_layer_params(d, F)
    full = L * H * params_per_head + L * params_per_mlp_layer
    head_score = (mha[:, None] * head).sum()
    int_score = (ffn[:, None] * intermediate).sum()
    if hidden is not None:
        # sum_{i,j} hidden_i * unit_j == sum(hidden) * sum(unit): the reference's outer product
        expected = hidden.sum() * (head_score * params_per_head / d + int_score * 2.0)
    else:
        expected = head_score * params_per_head + int_score * float(params_per_mlp_layer // F)
    return expected, 1.0 - expected / full
