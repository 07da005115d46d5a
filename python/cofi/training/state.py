"""Checkpoint state of a training stage: the loop counters (``LoopState``), building the state a
checkpoint holds (tensors and plain data only: checkpoints load with ``weights_only=True``),
checking a loaded one, and every rank's own generator states."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint as C
from . import distributed as dd


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_sparsity: float | None = None
    last_eval: dict = field(default_factory=dict)


def plain(x: Any) -> Any:
    """``x`` with numpy scalars/arrays turned into Python numbers/lists (checkpoints hold plain data)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _plain_data(x: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if x is None or type(x) in (bool, int, float, str):
        return True
    if isinstance(x, (list, tuple)):
        return all(_plain_data(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain_data(v, depth + 1) for k, v in x.items())
    return False


_LOOP_TYPES = {"step": (int,), "epoch": (int,), "batch_in_epoch": (int,), "best_metric": (float, int, type(None)),
               "best_step": (int, type(None)), "best_sparsity": (float, int, type(None)), "last_eval": (dict,)}


def check_train_state(st: dict, want: dict[str, dict[str, tuple[int, ...]]] | None = None) -> str | None:
    """Why ``st`` is not a trainer checkpoint state (None = it is): keys, types, and, for the
    parts named in ``want``, the tensor names and shapes the current models have."""
    if not isinstance(st.get("phase"), str):
        return "phase is missing or not a string"
    loop = st.get("loop")
    if not isinstance(loop, dict) or set(loop) != set(_LOOP_TYPES):
        return f"loop must have the keys {sorted(_LOOP_TYPES)}"
    for k, types in _LOOP_TYPES.items():
        if type(loop[k]) not in types or (types[0] is int and isinstance(loop[k], int) and loop[k] < 0):
            return f"loop.{k} = {loop[k]!r} is not a valid {types[0].__name__}"
    if not _plain_data(loop["last_eval"]):
        return "loop.last_eval is not plain data"
    if not isinstance(st.get("config"), dict) or not _plain_data(st["config"]):
        return "config is missing or not plain data"
    for k in ("model", "maskset", "proj"):
        if k in st or k == "model":
            why = C.tensor_dict_problem(st.get(k), k)
            if why is not None:
                return why
    optim = st.get("optim")
    if not isinstance(optim, dict) or not all(isinstance(optim.get(k), dict) for k in ("opt", "sched")):
        return "optim must hold the opt and sched state dicts"
    rr = st.get("rng_ranks")
    if rr is not None:
        lists = list(rr.values()) if isinstance(rr, dict) and "torch" in rr and set(rr) <= {"torch", "cuda"} else []
        if not lists or not all(isinstance(v, list) and len(v) == len(lists[0]) > 0 and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in v) for v in lists):
            return "rng_ranks must hold lists of uint8 generator states, one per rank"
    if "prune_result" in st and not (st["prune_result"] is None or (isinstance(st["prune_result"], dict)
                                                                    and _plain_data(st["prune_result"]))):
        return "prune_result is not plain data"
    for part, w in (want or {}).items():
        if part not in st:
            return f"it has no {part} state"
        got = shapes(st[part])
        if got != w:
            bad = sorted(set(got) ^ set(w)) or [k for k in w if got[k] != w[k]]
            return f"its {part} does not fit this run's ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return None


def current_shapes(stage: str | None, student: torch.nn.Module, maskset: torch.nn.Module | None,
                   proj: torch.nn.Module | None) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shapes a checkpoint of ``stage`` must have to load into this run's models."""
    if stage == "compact":  # the folded model's shape is known only after folding
        return {}
    out = {"model": shapes(student.state_dict())}
    if maskset is not None:
        out["maskset"] = shapes(maskset.state_dict())
    if proj is not None and stage == "prune":
        out["proj"] = shapes(proj.state_dict())
    return out


def build_state(stage: str, phase: str, ls: LoopState, config: dict, model: torch.nn.Module, optim: dict,
                mask_gen: torch.Generator | None, extras: dict[str, Any]) -> dict:
    """A checkpoint's state: stage, phase, loop counters, config, model, optimizers, RNG states,
    then the stage's ``extras`` (maskset / proj / prune_result)."""
    return {"stage": stage, "phase": phase, "loop": plain(ls.__dict__), "config": config, "model": model.state_dict(),
            "optim": optim, "rng": C.rng_state(mask_gen), **extras}


def rank_rng(dist: dd.DistInfo, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Every rank's own generator states (dropout draws differ per rank), gathered to all."""
    out = {"torch": dd.gather_tensors(torch.get_rng_state(), dist, device)}
    if device.type == "cuda" and torch.cuda.is_initialized():
        out["cuda"] = dd.gather_tensors(torch.cuda.get_rng_state(device), dist, device)
    return out


def set_rank_rng(st: dict, dist: dd.DistInfo, device: torch.device, log: Callable[[str], None]) -> None:
    rr, world = st.get("rng_ranks"), dist.world
    if rr is None or len(rr["torch"]) != world:
        if world > 1 or rr is not None:
            log(f"cofi: --resume with {world} process(es) from a checkpoint of "
                f"{len(rr['torch']) if rr else 1}: the dropout draws differ from an uninterrupted run")
        return
    torch.set_rng_state(rr["torch"][dist.rank])
    if "cuda" in rr and device.type == "cuda":
        torch.cuda.set_rng_state(rr["cuda"][dist.rank], device)
