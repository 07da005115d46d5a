"""One training step's mask work for a BERT-base mask set: the fused cofi ops vs the eager reference.

Per step CoFi samples every mask (hidden 768, heads 12x12, MHA 12, intermediate 12x3072, FFN 12),
computes keep probabilities and the expected size / sparsity, and back-propagates the Lagrangian and
the task loss into log_alpha. Providers: ``reference`` (the eager formulas, one tensor per group, as
the CoFi code does them), ``reference_compiled`` (the same under torch.compile; not with --quick),
``native`` (the fused hard_concrete_step, one op each way), ``native_unfused`` (sample, keep-prob and
expected_size as three cofi ops), ``triton`` (GPU). Mode fwd_bwd only; always float32 (the mask
parameters are fp32 master weights under every precision).
"""
from __future__ import annotations

from typing import Iterator

import torch

from .. import ops
from ..ops.reference import expected_size_ref, hard_concrete_keep_prob_ref, hard_concrete_sample_ref
from ..vocab import GROUPS, group_shapes
from .core import Case, OpBench, Provider, Settings

CONFIGS = {"bert-base": (12, 768, 12, 3072), "minilm-l6": (6, 384, 12, 1536)}
TARGET = 0.5


def make_groups(L: int, d: int, Hh: int, F: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Every group's log_alpha flattened in GROUPS order (requires grad), and the group shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = group_shapes(L, d, Hh, F)
    flat = torch.cat([torch.randn(*sh, generator=g).reshape(-1) * 2 + 1 for sh in shapes.values()]).to(device, dtype)
    return flat.requires_grad_(), shapes


def split(x: torch.Tensor, shapes: dict) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, sh in shapes.items():
        n = torch.Size(sh).numel()
        out[k] = x[i:i + n].view(sh)
        i += n
    return out


def _loss(s: torch.Tensor, z_sum: torch.Tensor) -> torch.Tensor:
    return 0.5 * (s - TARGET) + 0.1 * (s - TARGET) ** 2 + z_sum * 1e-4


def reference_step(flat, u, shapes, cfg):
    """The reference's way: one sample and one CDF per group, expected size from the groups."""
    la, us = split(flat, shapes), split(u, shapes)
    zs = {k: hard_concrete_sample_ref(la[k], us[k]) for k in la}
    ps = {k: hard_concrete_keep_prob_ref(la[k]) for k in la}
    _, s = expected_size_ref(*(ps[g] for g in GROUPS), *cfg)
    return _loss(s, sum(z.sum() for z in zs.values()))


def fused_step(flat, u, shapes, cfg, backend="native"):
    """Everything in one op each way: cofi.ops.hard_concrete_step."""
    L, d, Hh, F = cfg
    offsets, i = {}, 0
    for k, sh in shapes.items():
        offsets[k] = i
        i += torch.Size(sh).numel()
    r = ops.hard_concrete_step(flat, offsets, num_layers=L, hidden_size=d, num_heads=Hh, intermediate_size=F,
                               noise=u, backend=backend)
    return _loss(r.expected_sparsity, r.z.sum())


def unfused_step(flat, u, shapes, cfg, backend="native"):
    z = ops.hard_concrete_sample(flat, noise=u, backend=backend)  # one launch for every group
    p = split(ops.hard_concrete_keep_prob(flat, backend=backend), shapes)
    L, d, Hh, F = cfg
    _, s = ops.expected_size(num_layers=L, hidden_size=d, num_heads=Hh, intermediate_size=F, backend=backend, **p)
    return _loss(s, z.sum())


def cases(s: Settings) -> Iterator[Case]:
    for name, cfg in CONFIGS.items():
        if s.quick and name != "bert-base":
            continue
        flat, shapes = make_groups(*cfg, s.device, s.dtype)
        u = (torch.rand(flat.shape, generator=torch.Generator().manual_seed(1)) * 0.998 + 0.001).to(s.device, s.dtype)
        yield Case(f"{name} {flat.numel():,} masks", {"config": name, "mask_elements": flat.numel()},
                   (flat, u, shapes, cfg), (0,))


def providers(s: Settings) -> list[Provider]:
    p = [Provider("reference", reference_step), Provider("native", fused_step, "native"),
         Provider("native_unfused", unfused_step, "native", ran_op="hard_concrete_sample")]
    if s.device.startswith("cuda"):
        p.append(Provider("triton", lambda *a: fused_step(*a, backend="triton"), "triton"))
    if not s.quick:
        p.append(Provider("reference_compiled", torch.compile(reference_step)))
    return p


BENCH = OpBench("hard_concrete", "hard_concrete_step", cases, providers,
                auto=lambda *a: fused_step(*a, backend=None), modes=("fwd_bwd",), dtypes=(torch.float32,),
                doc=__doc__.splitlines()[0])
