"""masked_rms_norm on SmolLM2 rows: cofi's backends vs the eager masked reference vs F.rms_norm.

x, residual [tokens, 576] (SmolLM2-135M's hidden size); hidden_z with 0 / 10 / 50 % exact zeros, and
None (plain RMSNorm + residual). Providers: ``dense`` (F.rms_norm(x + residual): the unmasked cost),
``reference`` (masked_rms_norm_ref), ``native``, ``triton`` (GPU). GB/s count x, residual and y once
(fwd) plus grads.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.reference import masked_rms_norm_ref
from .core import Case, OpBench, Provider, Settings

D, TOKENS, QUICK_TOKENS = 576, 4096, 1024
PRUNED = (None, 0.0, 0.1, 0.5)
EPS = 1e-5


def make(n: int, d: int, pruned: float | None, device: str, dtype: torch.dtype) -> tuple:
    """x, residual [n, d], weight [d], hidden_z [d] or None (tensors require grad)."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(d, generator=g)]
    z = None
    if pruned is not None:
        z = torch.rand(d, generator=g) * 0.5 + 0.5
        z[torch.randperm(d, generator=g)[: int(pruned * d)]] = 0
    return tuple(t.to(device, dtype).requires_grad_() if t is not None else None for t in (*ts, z))


def cases(s: Settings) -> Iterator[Case]:
    n = QUICK_TOKENS if s.quick and not s.device.startswith("cuda") else TOKENS
    for pruned in ((None, 0.5) if s.quick else PRUNED):
        args = make(n, D, pruned, s.device, s.dtype)
        size = args[0].element_size()

        def metrics(mode: str, ms: float, nb=size * n * D) -> dict:
            return {"gb_per_s": round(nb * (3 if mode == "fwd" else 7) / ms / 1e6, 2)}

        yield Case(f"{n} x {D} " + ("no mask" if pruned is None else f"pruned {pruned:g}"),
                   {"tokens": n, "d": D, "pruned_fraction": pruned}, args,
                   tuple(i for i, t in enumerate(args) if t is not None), metrics)


def _ref(x, r, w, z):
    return masked_rms_norm_ref(x, r, w, z, EPS)


def _dense(x, r, w, z):
    return F.rms_norm(x + r, (x.shape[-1],), w, EPS)


def providers(s: Settings) -> list[Provider]:
    p = [Provider("reference", _ref), Provider("dense", _dense, compare=0),
         Provider("native", lambda *a: ops.masked_rms_norm(*a, eps=EPS, backend="native"), "native")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", lambda *a: ops.masked_rms_norm(*a, eps=EPS, backend="triton"), "triton"))
    return p


BENCH = OpBench("masked_rms_norm", "masked_rms_norm", cases, providers,
                auto=lambda *a: ops.masked_rms_norm(*a, eps=EPS), baselines=("reference", "dense"),
                doc=__doc__.splitlines()[0])
