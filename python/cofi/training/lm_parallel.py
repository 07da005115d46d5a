"""``cofi prune-lm`` under ``torchrun``: data parallel, or FSDP2 with ``--fsdp`` (docs/decoder.md,
"Multi-process").

Every rank holds the same masks and Lagrangian multipliers: the mask generator is seeded alike on
all ranks and advanced only by sampling, so each step draws the same mask sample everywhere; the
gradients of ``log_alpha`` and the lambdas are averaged with the model's. Each rank trains on its
equal slice of the step's global batch (``batch_size`` must be a multiple of the world size), so the
average of the ranks' mean losses is the global batch's mean and the run equals one process with
the same global batch up to float32 summation order.

Data parallel: the student and teacher are replicated, gradients all-reduced in one flat buffer
(``distributed.average_grads``). FSDP2: student and teacher are wrapped with ``fully_shard`` per
decoder layer and at the root (embeddings, final norm, LM head); their parameters, gradients and
the AdamW states are sharded, the masks and lambdas replicated. Checkpoints gather full state dicts
(model and optimizer in single-process layout), so one process can resume an FSDP run and the other
way round. Only rank 0 writes files and logs.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from . import distributed as dd


def _full(x: Any) -> Any:
    """``x`` with every DTensor replaced by its full tensor (a collective for sharded ones)."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, dict):
        return {k: _full(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_full(v) for v in x)
    return x


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``ref`` (sharded the same way when ``ref`` is a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)
    return full


class LMParallel:
    """This process's part in a ``prune-lm`` run: alone (world 1), data parallel, or FSDP2."""

    def __init__(self, info: dd.DistInfo, fsdp: bool) -> None:
        self.dist, self.fsdp = info, fsdp

    @classmethod
    def start(cls, device: str, fsdp: bool, batch_size: int, precision: str) -> LMParallel:
        """Join torchrun's process group (when WORLD_SIZE > 1) and check the run can be split."""
        who = "cofi prune-lm"
        world = dd.init(device)
        if fsdp and world.world < 2:
            raise UserError(f"{who}: --fsdp shards the model over torchrun's processes: run it under torchrun "
                            f"--nproc_per_node=N with N >= 2, got WORLD_SIZE={world.world}")
        if fsdp and precision == "fp16":
            raise UserError(f"{who}: --fsdp with --precision fp16 is not supported (the fp16 loss scaler does not "
                            "handle sharded gradients); use --precision bf16 or fp32")
        if batch_size % world.world:
            raise UserError(f"{who}: --batch-size must be a multiple of the {world.world} torchrun processes (each "
                            f"trains on an equal slice of the global batch), got {batch_size}")
        return cls(world, fsdp)

    @property
    def main(self) -> bool:
        return self.dist.main

    @property
    def world(self) -> int:
        return self.dist.world

    def barrier(self) -> None:
        dd.barrier(self.dist)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ steps
    def local(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch ids [B, S] -> [B / world, S]."""
        if self.world == 1:
            return ids
        b = ids.shape[0] // self.world
        return ids[self.dist.rank * b:(self.dist.rank + 1) * b]

    def mean(self, rec: dict[str, float]) -> dict[str, float]:
        """The global batch's step record: each value averaged over ranks (equal slices)."""
        if self.world == 1 or not rec:
            return rec
        keys = sorted(rec)
        t = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        t /= self.world
        return {**rec, **{k: float(v) for k, v in zip(keys, t.tolist())}}

    # ------------------------------------------------------------------ wrapping
    def wrap(self, student: nn.Module, teacher: nn.Module) -> None:
        """With FSDP, shard both models (``fully_shard`` per decoder layer, then the root)."""
        if not self.fsdp:
            return
        for m in (student, teacher):
            _shard(m)

    def adopt(self, optim: Any) -> None:
        """With FSDP the model's gradients arrive averaged and sharded (reduce-scatter); the
        optimizers' own all-reduce then covers only the replicated log_alpha and lambdas."""
        if self.fsdp:
            optim.params = optim.params[len(optim.model_params):]

    # ------------------------------------------------------------------ state
    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full state dict (a collective under FSDP: every rank calls it)."""
        return _full(model.state_dict()) if self.fsdp else model.state_dict()

    def optim_state(self, optim: Any) -> dict:
        """``Optimizers.state_dict`` with full tensors: the single-process layout."""
        return _full(optim.state_dict()) if self.fsdp else optim.state_dict()

    def load_model_state(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            mine = model.state_dict()
            sd = {k: _like(v, mine[k]) if k in mine else v for k, v in sd.items()}
        model.load_state_dict(sd)

    def load_optim_state(self, optim: Any, st: dict) -> None:
        if self.fsdp:
            st = dict(st)
            params = [p for g in optim.opt.param_groups for p in g["params"]]
            inner = copy.copy(st["opt"])
            inner["state"] = {i: {k: _like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
                                  for k, v in s.items()} for i, s in st["opt"]["state"].items()}
            st["opt"] = inner
        optim.load_state_dict(st)

    def plain(self, model: nn.Module) -> nn.Module:
        """An unsharded copy of ``model`` on every rank (the fold and the final evaluations run on
        it), or ``model`` itself without FSDP."""
        if not self.fsdp:
            return model
        from ..models.llama import CoFiLlamaForCausalLM

        sd = self.model_state(model)
        out = CoFiLlamaForCausalLM(model.config, init_weights=False).to(next(iter(sd.values())).device)
        out.load_state_dict(sd)
        return out.train(model.training)


def _shard(model: nn.Module) -> None:
    """``fully_shard`` on every decoder layer, then on the root.

    The masked Llama's forward reads each layer's weights inside its own loop (it never calls the
    layer modules), so FSDP2's per-module hooks would never gather them: a forward pre-hook on the
    root gathers every layer before the loop; backward reshards them (FSDP2's final callback,
    after reduce-scattering their gradients), and a forward without grad (the teacher, evaluation)
    reshards them at once."""
    from torch.distributed.fsdp import fully_shard

    layers = list(model.model.layers)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)

    def gather(_m: nn.Module, _args: Any) -> None:
        for layer in layers:
            layer.unshard()

    def release(_m: nn.Module, _args: Any, _out: Any) -> None:
        if not torch.is_grad_enabled():
            for layer in layers:
                layer.reshard()

    model.register_forward_pre_hook(gather)
    model.register_forward_hook(release)


__all__ = ["LMParallel"]
