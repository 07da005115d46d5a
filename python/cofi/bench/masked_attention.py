"""masked_attention: cofi's backends vs the eager masked reference vs SDPA on all heads.

Shapes: BERT-base heads (B=32, S=128 and B=1, S=512, H=12, D=64, bidirectional) and SmolLM2-135M's
causal grouped-query attention (B=1, S=512, 9 query heads sharing 3 K/V heads, D=64, causal=True);
no padding mask; live-head fractions 1.0, 0.5, 0.1 (dead heads have gate exactly 0). Providers:
``reference`` (the eager masked reference, all heads), ``sdpa``
(torch.nn.functional.scaled_dot_product_attention on all heads with ``is_causal`` / ``enable_gqa``,
then gated: what a dense model pays whatever the pruning; flash attention on a GPU), ``native``,
``triton`` (GPU), ``cofi_sdpa`` (cofi's ``sdpa`` backend: SDPA on the live heads only). FLOP/s count
the live heads: 4 B H_live S^2 D (fwd), x3.5 for fwd_bwd (recompute + 5 matmuls), halved for causal
(the key blocks above the diagonal are not computed).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..ops.masked_attention import masked_attention
from ..ops.reference.masked_attention import masked_attention_ref
from .core import Case, OpBench, Provider, Settings

CONFIGS = {"bert-base-b32-s128": (32, 12, 128, 64), "bert-base-b1-s512": (1, 12, 512, 64)}  # (B, H, S, D)
GQA_CONFIGS = {"smollm2-causal-gqa-b1-s512": (1, 9, 3, 512, 64)}  # (B, H, Hkv, S, D), causal
FRACTIONS = (1.0, 0.5, 0.1)


def make(Bsz: int, Hh: int, Hkv: int, S: int, D: int, frac: float, device: str, dtype: torch.dtype) -> tuple:
    """q [B, H, S, D], k, v [B, Hkv, S, D] and head_z [H] (the last 1 - frac of the heads dead), all
    requiring grad."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(Bsz, Hh, S, D, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(Bsz, Hkv, S, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    z = torch.rand(Hh, generator=g) * 0.5 + 0.5
    z[max(1, round(frac * Hh)):] = 0.0
    return q, k, v, z.to(device, dtype).requires_grad_()


def cases(s: Settings) -> Iterator[Case]:
    configs = CONFIGS if (not s.quick or s.device.startswith("cuda")) else dict(list(CONFIGS.items())[1:])
    shapes = [(name, (Bsz, Hh, Hh, S, D), False) for name, (Bsz, Hh, S, D) in configs.items()]
    shapes += [(name, shape, True) for name, shape in GQA_CONFIGS.items()]
    for name, (Bsz, Hh, Hkv, S, D), causal in shapes:
        for frac in ((1.0, 0.1) if s.quick else FRACTIONS):
            # the causal flag is a 5th argument of the causal cases only (providers default to False)
            args = make(Bsz, Hh, Hkv, S, D, frac, s.device, s.dtype) + ((True,) if causal else ())
            live = int((args[3] != 0).sum())

            def metrics(mode: str, ms: float, n=Bsz * live * S * S * D * (0.5 if causal else 1.0)) -> dict:
                return {"gflops_live": round(4 * n * (3.5 if mode == "fwd_bwd" else 1.0) / (ms * 1e-3) / 1e9, 2)}

            kv = f" KV{Hkv}" if Hkv != Hh else ""
            gqa = {"Hkv": Hkv, "causal": True} if causal else {}  # MHA rows keep their shape keys
            yield Case(f"B{Bsz} S{S} H{Hh}{kv} D{D}{' causal' if causal else ''} live {live}/{Hh}",
                       {"config": name, "B": Bsz, "H": Hh, **gqa, "S": S, "D": D, "live_frac": frac,
                        "live_heads": live},
                       args, (0, 1, 2, 3), metrics)


def _sdpa_all_heads(q, k, v, z, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1]) * z[None, :, None, None]


def _cofi(backend: str | None):
    return lambda q, k, v, z, causal=False: masked_attention(q, k, v, z, backend=backend, causal=causal)


def providers(s: Settings) -> list[Provider]:
    p = [Provider("reference", lambda q, k, v, z, causal=False: masked_attention_ref(q, k, v, z, causal=causal)),
         # computes the dead heads too, so its d head_z there is the dense one: check out, dq, dk, dv
         Provider("sdpa", _sdpa_all_heads, compare=4),
         Provider("native", _cofi("native"), "native")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", _cofi("triton"), "triton"))
    p.append(Provider("cofi_sdpa", _cofi("sdpa"), "sdpa"))
    return p


BENCH = OpBench("masked_attention", "masked_attention", cases, providers,
                auto=_cofi(None), baselines=("reference", "sdpa"),
                doc=__doc__.splitlines()[0])
