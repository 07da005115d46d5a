"""masked_ffn on BERT-base FFN sizes and SwiGLU on SmolLM2 sizes: cofi's backends vs the eager masked
reference vs a dense FFN.

BERT-base (GELU, biases): live-unit fractions 1.0, 0.5, 0.1, 0.02 of int_z (dead units exactly 0,
mlp_z = 1). SmolLM2 (SwiGLU, hidden 576, intermediate 1536, no biases, as LlamaMLP): fractions 1.0
and 0.5. Every weight and both masks require grad in fwd_bwd, as in CoFi training. Providers:
``dense`` (no masks, the unpruned cost: nn.Linear + GELU + nn.Linear, or LlamaMLP's
down(silu(gate(x)) * up(x))), ``reference`` (dense GEMMs then multiply, as the CoFi code does),
``native``, ``triton`` (GPU). Case args are (x, w1, b1, w2, b2, int_z, mlp_z, wg): wg (the gate
weight) is None in the GELU cases. FLOP/s count the live units.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.masked_ffn_gated import OP as GATED_OP
from ..ops.reference import masked_ffn_gated_ref, masked_ffn_ref
from .core import Case, OpBench, Provider, Settings

CONFIGS = {"bert-base": (768, 3072)}
GATED_CONFIGS = {"smollm2": (576, 1536)}
TOKENS, QUICK_TOKENS = 4096, 512
FRACTIONS = (1.0, 0.5, 0.1, 0.02)
GATED_FRACTIONS = (1.0, 0.5)


def make(n: int, d: int, f: int, frac: float, device: str, dtype: torch.dtype) -> tuple:
    """x [n, d], w1 [F, d], b1 [F], w2 [d, F], b2 [d], int_z [F], mlp_z [] (all requiring grad)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    ts = [r(n, d), r(f, d) * 0.03, r(f) * 0.1, r(d, f) * 0.03, r(d) * 0.1]
    z = torch.rand(f, generator=g) * 0.5 + 0.5
    z[torch.randperm(f, generator=g)[: f - int(round(frac * f))]] = 0
    return tuple(t.to(device, dtype).requires_grad_() for t in ts + [z, torch.tensor(1.0)])


def make_gated(n: int, d: int, f: int, frac: float, device: str, dtype: torch.dtype) -> tuple:
    """(x, up [F, d], None, down [d, F], None, int_z, mlp_z, gate [F, d]): LlamaMLP, no biases."""
    x, w1, _, w2, _, z, m = make(n, d, f, frac, device, dtype)
    g = torch.Generator().manual_seed(1)
    wg = (torch.randn(f, d, generator=g) * 0.03).to(device, dtype).requires_grad_()
    return x, w1, None, w2, None, z, m, wg


def _case(n: int, d: int, f: int, frac: float, cfg: str, gated: bool, s: Settings) -> Case:
    args = make_gated(n, d, f, frac, s.device, s.dtype) if gated else (*make(n, d, f, frac, s.device, s.dtype), None)
    live = int((args[5] != 0).sum())
    flops = 2 * n * d * live * (3 if gated else 2)

    def metrics(mode: str, ms: float) -> dict:
        return {"live_gflops": round(flops * (3 if mode == "fwd_bwd" else 1) / ms / 1e6, 1)}

    act = "swiglu" if gated else "gelu"
    return Case(f"{n} x {d} x {f} live {frac:g}" + (" swiglu" if gated else ""),
                {"config": cfg, "tokens": n, "d": d, "F": f, "live_fraction": frac, "activation": act}, args,
                (0, 1, 3, 5, 6, 7) if gated else tuple(range(7)), metrics, ran_op=GATED_OP if gated else None)


def cases(s: Settings) -> Iterator[Case]:
    n = QUICK_TOKENS if s.quick and not s.device.startswith("cuda") else TOKENS
    for cfg, (d, f) in CONFIGS.items():
        for frac in ((1.0, 0.1) if s.quick else FRACTIONS):
            yield _case(n, d, f, frac, cfg, False, s)
    for cfg, (d, f) in GATED_CONFIGS.items():
        for frac in GATED_FRACTIONS:
            yield _case(n, d, f, frac, cfg, True, s)


def _dense(x, w1, b1, w2, b2, z, m, wg):
    if wg is not None:  # LlamaMLP: down(silu(gate(x)) * up(x))
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, w1), w2)
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _ref(x, w1, b1, w2, b2, z, m, wg):
    if wg is not None:
        return masked_ffn_gated_ref(x, wg, None, w1, b1, w2, b2, z, m, "swiglu")
    return masked_ffn_ref(x, w1, b1, w2, b2, z, m)


def _op(backend: str | None) -> Callable[..., torch.Tensor]:
    def fn(x, w1, b1, w2, b2, z, m, wg):
        return ops.masked_ffn(x, w1, b1, w2, b2, z, m, activation="gelu" if wg is None else "swiglu",
                              gate_weight=wg, backend=backend)
    return fn


def providers(s: Settings) -> list[Provider]:
    # dense has no masks: its output differs, so it is timed but not checked
    p = [Provider("reference", _ref), Provider("dense", _dense, compare=0),
         Provider("native", _op("native"), "native")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", _op("triton"), "triton"))
    return p


BENCH = OpBench("masked_ffn", "masked_ffn", cases, providers, auto=_op(None),
                baselines=("reference", "dense"), doc=__doc__.splitlines()[0])
