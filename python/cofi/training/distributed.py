"""Data-parallel helpers (``torchrun --nproc_per_node=N cofi prune ...``).

Gradients are averaged with one flat all-reduce per step (the same arithmetic as DDP's bucketed
all-reduce, without DDP's unused-parameter bookkeeping, which compacted steps would trip: units
cut out of a step get no gradient). Every rank draws the SAME mask sample (a mask generator seeded
identically on all ranks and advanced only by sampling) and computes the same Lagrangian.

Each step's global batch is cut into contiguous rank slices (``local_batch``). Slices may differ by
one example (a short last batch), so each rank's gradient and logged losses are weighted by its
share of the batch: the average is the global batch's mean, as one process computes it. A global
batch with fewer examples than ranks is run whole on every rank (no rank gets an empty slice).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from ..data import rank_slice
from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """``rank`` of ``world`` processes; ``share``: world x this rank's fraction of the current
    global batch (1.0 when the slices are equal; set per step by ``local_batch``)."""
    rank: int = 0
    world: int = 1
    share: float = 1.0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> DistInfo:
    """This process's rank and the world size from torchrun's environment (joins the process group
    when there are several). With ``device`` "cuda" each process makes GPU ``LOCAL_RANK`` its current
    device (so "cuda" means that GPU); an explicit "cuda:N" shared by the processes of a node is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if device.startswith("cuda"):
        local, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if torch.device(device).index is None:
            torch.cuda.set_device(local)
        elif local_world > 1:
            raise UserError(f"cofi: device {device!r} with {local_world} processes on this node would put them all on "
                            "one GPU; pass --device cuda (each process takes GPU LOCAL_RANK)")
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


def local_batch(batch: np.ndarray, info: DistInfo) -> tuple[np.ndarray, DistInfo]:
    """This rank's example indices of the global ``batch`` [n] and ``info`` with its ``share``.
    With fewer examples than ranks every rank takes the whole batch (share 1)."""
    if info.world <= 1:
        return batch, info
    if len(batch) < info.world:
        return batch, dataclasses.replace(info, share=1.0)
    mine = rank_slice(batch, info.rank, info.world)
    return mine, dataclasses.replace(info, share=info.world * len(mine) / len(batch))


def average_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Each parameter's gradient averaged over ranks, weighted by ``info.share`` (a missing
    gradient counts as zero)."""
    if info.world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if info.share != 1.0:
        flat *= info.share
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


def mean_record(rec: dict[str, Any], info: DistInfo) -> dict[str, Any]:
    """``rec`` with its scalar tensors (a step's losses, sparsities, lambdas) replaced by their
    share-weighted mean over ranks, i.e. the global batch's values (a collective: all ranks call it
    with the same keys). Values that are not tensors are left as they are."""
    keys = [k for k, v in rec.items() if torch.is_tensor(v) and v.numel() == 1]
    if info.world <= 1 or not keys:
        return rec
    flat = torch.stack([rec[k].detach().reshape(()).double() for k in keys]) * info.share
    dist.all_reduce(flat)
    flat /= info.world
    return {**rec, **{k: flat[i] for i, k in enumerate(keys)}}


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
