"""Mixed precision of a run (``precision: fp32 | bf16 | fp16``).

bf16 / fp16 run the model forwards (student, teacher, teacher cache, evaluation) under
``torch.autocast(device_type, dtype)``; what the ops do there is their autocast policy
(docs/ops-inputs.md). Everything else stays fp32: the parameters (master weights) and the
optimizer state, the masks' log_alpha, their sampling and the Lagrangian (computed outside
autocast), the fold into the compact model, and the loss terms: the model outputs are cast to fp32
(``outputs_fp32``) and the losses computed outside autocast, because the layer-matching distance
casts the teacher states to the student's dtype and CE / KL in bf16 lose the small differences
distillation learns from. fp16 also scales the loss (``torch.amp.GradScaler``, in
``optim.Optimizers``; its state is saved with the optimizers); bf16 has fp32's range and needs no
scaler.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager

import torch

from ..vocab import PRECISION_DTYPES

DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in PRECISION_DTYPES.items()}
_LOW = (torch.bfloat16, torch.float16)


def autocast(precision: str, device: torch.device | str) -> ContextManager[Any]:
    """``torch.autocast`` of ``precision`` on ``device``'s type (fp32: no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def no_autocast(device: torch.device | str) -> ContextManager[Any]:
    """Autocast off on ``device``'s type (backward and optimizer steps, whatever the caller's context)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16, None otherwise."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def fp32(t: Any) -> Any:
    """A bf16 / fp16 tensor as float32; anything else (fp32, fp64, None, ints) unchanged."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW else t


def outputs_fp32(out: Any) -> Any:
    """A model output (``CoFiOutput``, ``CompactOutput``, a namespace) with its low-precision
    logits and hidden states as float32 (a shallow copy; the rest shared)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        vals = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    else:
        vals = dict(vars(out))
    changed = {}
    for k in ("logits", "start_logits", "end_logits"):
        if k in vals and fp32(vals[k]) is not vals[k]:
            changed[k] = fp32(vals[k])
    hs = vals.get("hidden_states")
    if hs is not None and any(fp32(h) is not h for h in hs):
        changed["hidden_states"] = type(hs)(fp32(h) for h in hs)
    if not changed:
        return out
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **changed)
    return type(out)(**{**vals, **changed})
