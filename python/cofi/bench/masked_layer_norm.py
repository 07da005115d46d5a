"""masked_layer_norm on BERT-base rows: cofi's backends vs the eager masked reference vs F.layer_norm.

x, residual [tokens, 768]; hidden_z with 0 / 10 / 50 % exact zeros, and None (the runtime's plain
LayerNorm + residual). Providers: ``dense`` (F.layer_norm(x + residual): the unmasked cost),
``reference``, ``native``, ``triton`` (GPU). GB/s count x, residual and y once (fwd) plus grads.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.reference import masked_layer_norm_ref
from .core import Case, OpBench, Provider, Settings

D, TOKENS, QUICK_TOKENS = 768, 4096, 1024
PRUNED = (None, 0.0, 0.1, 0.5)


def make(n: int, d: int, pruned: float | None, device: str, dtype: torch.dtype, vectors: int = 2) -> tuple:
    """x, residual [n, d], ``vectors`` [d] parameters (weight, bias), hidden_z [d] or None (tensors
    require grad); shared with the masked_rms_norm bench (``vectors=1``: weight only)."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)]
    ts += [torch.randn(d, generator=g) for _ in range(vectors)]
    z = None
    if pruned is not None:
        z = torch.rand(d, generator=g) * 0.5 + 0.5
        z[torch.randperm(d, generator=g)[: int(pruned * d)]] = 0
    return tuple(t.to(device, dtype).requires_grad_() if t is not None else None for t in (*ts, z))


def norm_cases(s: Settings, d: int, tokens: int, quick_tokens: int, pruned_set: tuple, vectors: int) -> Iterator[Case]:
    """Rows of a masked norm of width ``d`` at each pruned fraction (see :func:`make`)."""
    n = quick_tokens if s.quick and not s.device.startswith("cuda") else tokens
    for pruned in ((None, 0.5) if s.quick else pruned_set):
        args = make(n, d, pruned, s.device, s.dtype, vectors)
        size = args[0].element_size()

        def metrics(mode: str, ms: float, nb=size * n * d) -> dict:
            return {"gb_per_s": round(nb * (3 if mode == "fwd" else 7) / ms / 1e6, 2)}

        yield Case(f"{n} x {d} " + ("no mask" if pruned is None else f"pruned {pruned:g}"),
                   {"tokens": n, "d": d, "pruned_fraction": pruned}, args,
                   tuple(i for i, t in enumerate(args) if t is not None), metrics)


def cases(s: Settings) -> Iterator[Case]:
    return norm_cases(s, D, TOKENS, QUICK_TOKENS, PRUNED, vectors=2)


def _dense(x, r, w, b, z):
    return F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-12)


def providers(s: Settings) -> list[Provider]:
    p = [Provider("reference", masked_layer_norm_ref), Provider("dense", _dense, compare=0),
         Provider("native", lambda *a: ops.masked_layer_norm(*a, backend="native"), "native")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", lambda *a: ops.masked_layer_norm(*a, backend="triton"), "triton"))
    return p


BENCH = OpBench("masked_layer_norm", "masked_layer_norm", cases, providers,
                auto=lambda *a: ops.masked_layer_norm(*a), baselines=("reference", "dense"),
                doc=__doc__.splitlines()[0])
