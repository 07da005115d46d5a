"""masked_rms_norm on SmolLM2 rows: cofi's backends vs the eager masked reference vs F.rms_norm.

x, residual [tokens, 576] (SmolLM2-135M's hidden size); hidden_z with 0 / 10 / 50 % exact zeros, and
None (plain RMSNorm + residual). Providers: ``dense`` (F.rms_norm(x + residual): the unmasked cost),
``reference`` (masked_rms_norm_ref), ``native``, ``triton`` (GPU). GB/s count x, residual and y once
(fwd) plus grads.
"""
from __future__ import annotations

from typing import Iterator

import torch.nn.functional as F

from .. import ops
from ..ops.reference import masked_rms_norm_ref
from .core import Case, OpBench, Provider, Settings
from .masked_layer_norm import norm_cases

D, TOKENS, QUICK_TOKENS = 576, 4096, 1024
PRUNED = (None, 0.0, 0.1, 0.5)
EPS = 1e-5


def cases(s: Settings) -> Iterator[Case]:
    return norm_cases(s, D, TOKENS, QUICK_TOKENS, PRUNED, vectors=1)


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
