"""masked_attention: cofi's backends vs the eager masked reference vs SDPA on all heads.

Shapes (BERT-base heads): B=32, S=128 and B=1, S=512, H=12, D=64, no padding mask; live-head
fractions 1.0, 0.5, 0.1 (dead heads have gate exactly 0). Providers: ``reference`` (the eager
masked reference, all heads), ``sdpa`` (torch.nn.functional.scaled_dot_product_attention on all heads,
then gated: what a dense model pays whatever the pruning; flash attention on a GPU), ``native``,
``triton`` (GPU), ``cofi_sdpa`` (cofi's ``sdpa`` backend: SDPA on the live heads only). FLOP/s count
the live heads: 4 B H_live S^2 D (fwd), x3.5 for fwd_bwd (recompute + 5 matmuls).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..ops.masked_attention import masked_attention
from ..ops.reference.masked_attention import masked_attention_ref
from .core import Case, OpBench, Provider, Settings

CONFIGS = {"bert-base-b32-s128": (32, 12, 128, 64), "bert-base-b1-s512": (1, 12, 512, 64)}
FRACTIONS = (1.0, 0.5, 0.1)


def make(Bsz: int, Hh: int, S: int, D: int, frac: float, device: str, dtype: torch.dtype) -> tuple:
    """q, k, v [B, H, S, D] and head_z [H] (the last 1 - frac of the heads dead), all requiring grad."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(Bsz, Hh, S, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    z = torch.rand(Hh, generator=g) * 0.5 + 0.5
    z[max(1, round(frac * Hh)):] = 0.0
    return q, k, v, z.to(device, dtype).requires_grad_()


def cases(s: Settings) -> Iterator[Case]:
    configs = CONFIGS if (not s.quick or s.device.startswith("cuda")) else dict(list(CONFIGS.items())[1:])
    for name, (Bsz, Hh, S, D) in configs.items():
        for frac in ((1.0, 0.1) if s.quick else FRACTIONS):
            args = make(Bsz, Hh, S, D, frac, s.device, s.dtype)
            live = int((args[3] != 0).sum())

            def metrics(mode: str, ms: float, n=Bsz * live * S * S * D) -> dict:
                return {"gflops_live": round(4 * n * (3.5 if mode == "fwd_bwd" else 1.0) / (ms * 1e-3) / 1e9, 2)}

            yield Case(f"B{Bsz} S{S} H{Hh} D{D} live {live}/{Hh}",
                       {"config": name, "B": Bsz, "H": Hh, "S": S, "D": D, "live_frac": frac, "live_heads": live},
                       args, (0, 1, 2, 3), metrics)


def _sdpa_all_heads(q, k, v, z):
    return F.scaled_dot_product_attention(q, k, v) * z[None, :, None, None]


def providers(s: Settings) -> list[Provider]:
    p = [Provider("reference", masked_attention_ref),
         # computes the dead heads too, so its d head_z there is the dense one: check out, dq, dk, dv
         Provider("sdpa", _sdpa_all_heads, compare=4),
         Provider("native", lambda q, k, v, z: masked_attention(q, k, v, z, backend="native"), "native")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", lambda q, k, v, z: masked_attention(q, k, v, z, backend="triton"), "triton"))
    p.append(Provider("cofi_sdpa", lambda q, k, v, z: masked_attention(q, k, v, z, backend="sdpa"), "sdpa"))
    return p


BENCH = OpBench("masked_attention", "masked_attention", cases, providers,
                auto=lambda q, k, v, z: masked_attention(q, k, v, z), baselines=("reference", "sdpa"),
                doc=__doc__.splitlines()[0])
