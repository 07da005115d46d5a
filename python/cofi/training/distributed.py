"""Data-parallel helpers (``torchrun --nproc_per_node=N cofi prune ...``).

Gradients are averaged with one flat all-reduce per step (the same arithmetic as DDP's bucketed
all-reduce, without DDP's unused-parameter bookkeeping, which compacted steps would trip: units
cut out of a step get no gradient). Every rank draws the SAME mask sample (a mask generator seeded
identically on all ranks and advanced only by sampling) and computes the same Lagrangian.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def broadcast_params(params: Iterable[torch.Tensor], info: DistInfo) -> None:
    if info.world > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, 0)


def average_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Mean of each parameter's gradient over ranks (a missing gradient counts as zero)."""
    if info.world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    o = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[o:o + n].view_as(p).clone()
        o += n


def all_reduce_mean_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t)
        t /= info.world
    return t


def all_true(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank iff ``flag`` is True on every rank (a collective: all ranks must call it).
    ``device``: where the backend reduces (a CUDA device for NCCL)."""
    if info.world <= 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_tensors(t: torch.Tensor, info: DistInfo, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks) in rank order, on the CPU (a
    collective: all ranks must call it). ``device``: where the backend gathers."""
    if info.world <= 1:
        return [t.cpu()]
    x = t.to(device)
    out = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(out, x)
    return [o.cpu() for o in out]
