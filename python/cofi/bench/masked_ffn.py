"""masked_ffn on BERT-base FFN sizes: cofi's backends vs the eager masked reference vs a dense FFN.

Live-unit fractions 1.0, 0.5, 0.1, 0.02 of int_z (dead units exactly 0, mlp_z = 1); every weight
and both masks require grad in fwd_bwd, as in CoFi training. Providers: ``dense`` (nn.Linear + GELU +
nn.Linear, no masks: the unpruned cost), ``reference`` (dense GEMMs then multiply, as the CoFi code
does), ``native``, ``triton`` (GPU). FLOP/s count the live units.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.reference import masked_ffn_ref
from .core import Case, OpBench, Provider, Settings

CONFIGS = {"bert-base": (768, 3072)}
TOKENS, QUICK_TOKENS = 4096, 512
FRACTIONS = (1.0, 0.5, 0.1, 0.02)


def make(n: int, d: int, f: int, frac: float, device: str, dtype: torch.dtype) -> tuple:
    """x [n, d], w1 [F, d], b1 [F], w2 [d, F], b2 [d], int_z [F], mlp_z [] (all requiring grad)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    ts = [r(n, d), r(f, d) * 0.03, r(f) * 0.1, r(d, f) * 0.03, r(d) * 0.1]
    z = torch.rand(f, generator=g) * 0.5 + 0.5
    z[torch.randperm(f, generator=g)[: f - int(round(frac * f))]] = 0
    return tuple(t.to(device, dtype).requires_grad_() for t in ts + [z, torch.tensor(1.0)])


def cases(s: Settings) -> Iterator[Case]:
    n = QUICK_TOKENS if s.quick and not s.device.startswith("cuda") else TOKENS
    for cfg, (d, f) in CONFIGS.items():
        for frac in ((1.0, 0.1) if s.quick else FRACTIONS):
            args = make(n, d, f, frac, s.device, s.dtype)
            live = int((args[5] != 0).sum())

            def metrics(mode: str, ms: float, fl=2 * n * d * live * 2) -> dict:
                return {"live_gflops": round(fl * (3 if mode == "fwd_bwd" else 1) / ms / 1e6, 1)}

            yield Case(f"{n} x {d} x {f} live {frac:g}",
                       {"config": cfg, "tokens": n, "d": d, "F": f, "live_fraction": frac},
                       args, tuple(range(7)), metrics)


def _dense(x, w1, b1, w2, b2, z, m):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def providers(s: Settings) -> list[Provider]:
    # dense has no masks: its output differs, so it is timed but not checked
    p = [Provider("reference", masked_ffn_ref), Provider("dense", _dense, compare=0),
         Provider("native", lambda *a: ops.masked_ffn(*a, backend="native"), "native")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", lambda *a: ops.masked_ffn(*a, backend="triton"), "triton"))
    return p


BENCH = OpBench("masked_ffn", "masked_ffn", cases, providers, auto=lambda *a: ops.masked_ffn(*a),
                baselines=("reference", "dense"), doc=__doc__.splitlines()[0])
