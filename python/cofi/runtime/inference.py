"""Batch inference with dynamic padding: sort by length, pad each batch only to its longest row."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import UserError
from .modeling import CompactModel


class NonFiniteOutputError(UserError):
    """The model gave NaN/inf outputs: no prediction or metric may be made from them."""


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first)."""
    if batch_size < 1:
        raise ValueError(f"cofi.runtime.predict: batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.inference_mode()
def predict(model: torch.nn.Module, features: Sequence[Mapping[str, Sequence[int]]],
            batch_size: int = 32, pad_token_id: int | None = None,
            device: str | torch.device | None = None, allow_nonfinite: bool = False) -> dict[str, object]:
    """Run ``model`` over tokenized ``features`` (each a mapping with ``input_ids`` and optionally
    ``token_type_ids``; lengths may differ), in the original order.

    Returns ``{"logits": [N, C] tensor}`` for classification or ``{"start_logits": [...],
    "end_logits": [...]}`` (lists of 1-D tensors, one per example, unpadded) for QA; a bf16 / fp16
    model's outputs are returned as float32 (numpy and the metrics take them as they are).
    NaN/inf outputs raise :class:`NonFiniteOutputError` (naming the first example) unless
    ``allow_nonfinite``.
    """
    if pad_token_id is None:
        cfg = getattr(model, "config", None)
        pad_token_id = int(getattr(cfg, "pad_token_id", 0) or 0)
    if device is None:
        device = next(model.parameters()).device
    lengths = [len(f["input_ids"]) for f in features]
    if isinstance(model, CompactModel):  # only real positions are read back: skip the padding
        prev, model.unpad = model.unpad, True
        try:
            out = _predict(model, features, lengths, batch_size, pad_token_id, device)
        finally:
            model.unpad = prev
    else:
        out = _predict(model, features, lengths, batch_size, pad_token_id, device)
    if not allow_nonfinite:
        _check_finite(out)
    return out


def _check_finite(out: dict[str, object]) -> None:
    if "logits" in out:
        ok = torch.isfinite(out["logits"]).flatten(1).all(dim=1)
    else:
        ok = torch.tensor([bool(torch.isfinite(s).all() and torch.isfinite(e).all())
                           for s, e in zip(out["start_logits"], out["end_logits"])], dtype=torch.bool)
    if not bool(ok.all()):
        first = int((~ok).nonzero()[0])
        raise NonFiniteOutputError(
            f"cofi.runtime.predict: the model gave NaN/inf outputs for {int((~ok).sum())} of "
            f"{len(ok)} examples (first: example {first}); its weights overflow on these inputs, "
            "so nothing is predicted from them")


def _predict(model: torch.nn.Module, features: Sequence[Mapping[str, Sequence[int]]], lengths: list[int],
             batch_size: int, pad_token_id: int, device: str | torch.device) -> dict[str, object]:
    results: dict[int, tuple[torch.Tensor, ...]] = {}
    for idx in length_sorted_batches(lengths, batch_size):
        S = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), S), pad_token_id, dtype=torch.long)
        tt = torch.zeros((len(idx), S), dtype=torch.long)
        am = torch.zeros((len(idx), S), dtype=torch.long)
        for r, i in enumerate(idx):
            n = lengths[i]
            ids[r, :n] = torch.as_tensor(features[i]["input_ids"], dtype=torch.long)
            if "token_type_ids" in features[i]:
                tt[r, :n] = torch.as_tensor(features[i]["token_type_ids"], dtype=torch.long)
            am[r, :n] = 1
        out = model(ids.to(device), attention_mask=am.to(device), token_type_ids=tt.to(device))
        out = {k: _fp32(getattr(out, k, None)) for k in ("logits", "start_logits", "end_logits")}
        if out["start_logits"] is not None:
            for r, i in enumerate(idx):
                n = lengths[i]
                results[i] = (out["start_logits"][r, :n].cpu(), out["end_logits"][r, :n].cpu())
        else:
            for r, i in enumerate(idx):
                results[i] = (out["logits"][r].cpu(),)
    n = len(features)
    if n and len(results[0]) == 2:
        return {"start_logits": [results[i][0] for i in range(n)],
                "end_logits": [results[i][1] for i in range(n)]}
    logits = torch.stack([results[i][0] for i in range(n)]) if n else torch.zeros(0)
    return {"logits": logits}


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


__all__ = ["length_sorted_batches", "predict", "CompactModel"]
