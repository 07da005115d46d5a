"""Evaluation on the task's eval set: classification / regression metrics from the logits, or for
QA the answer spans post-processed from start/end logits into SQuAD scores. NaN or infinite model
outputs give no metric: ``{"nonfinite": True}`` (logged as such, never picked as best)."""
from __future__ import annotations

import numpy as np
import torch

from .. import data as D
from .config import TrainConfig
from .precision import autocast
from .task import TaskBundle, forward, logits_of

NONFINITE = "nonfinite"


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: TaskBundle, cfg: TrainConfig, device: torch.device,
             masks=None) -> dict:
    """The task's metrics of ``model`` (with ``masks``, if given) on the eval set, at most
    ``cfg.max_eval_batches`` batches, under ``cfg.precision``'s autocast; ``{"nonfinite": True}``
    if any output is NaN or infinite."""
    was = model.training
    model.eval()
    enc = task.eval
    batches = D.eval_batches(enc.lengths, cfg.eval_batch_size)
    if cfg.max_eval_batches:
        batches = batches[: cfg.max_eval_batches]
    outs: dict[int, list[np.ndarray]] = {}
    finite = True
    for b in batches:
        batch = {k: v.to(device) for k, v in enc.collate(b).items()}
        with autocast(cfg.precision, device):
            out = forward(model, batch, masks, cfg.backend)
        ls = [x.float().cpu().numpy() for x in logits_of(out)]
        finite = finite and all(bool(np.isfinite(x).all()) for x in ls)
        for r, i in enumerate(b):
            outs[int(i)] = [x[r] for x in ls]
    model.train(was)
    if not finite:
        return {NONFINITE: True}
    idx = sorted(outs)
    if task.qa:
        return qa_scores(enc, outs, idx)
    logits = np.stack([outs[i][0] for i in idx])
    labels = enc.labels[idx]
    preds = logits[:, 0] if task.spec.kind == "regression" else logits.argmax(-1)
    return D.compute_metrics(task.spec.metrics, preds, labels)


def qa_scores(enc: D.Encoded, outs: dict[int, list[np.ndarray]], idx: list[int]) -> dict:
    """SQuAD scores of the answer spans post-processed from per-feature start/end logits."""
    S = max(len(outs[i][0]) for i in idx)
    st = np.full((len(enc), S), -1e9, dtype=np.float32)
    en = np.full((len(enc), S), -1e9, dtype=np.float32)
    for i in idx:
        st[i, : len(outs[i][0])] = outs[i][0]
        en[i, : len(outs[i][1])] = outs[i][1]
    preds = D.qa_predictions(enc, st, en)
    return D.squad_scores(preds, enc.extra["answers"])


def metric_value(m: dict, name: str) -> float | None:
    """The metric ``name`` of an evaluation, None when its outputs were not finite."""
    return None if m.get(NONFINITE) else m[name]


def describe(m: dict, name: str) -> str:
    """``name value`` for the log, or what went wrong."""
    v = metric_value(m, name)
    return "model outputs are NaN/inf (nonfinite: no metric, not a best candidate)" if v is None else f"{name} {v:.4f}"


def best_note(ls) -> str:
    """`` (best v @ step)`` of a loop state, once an evaluation was best."""
    return f" (best {ls.best_metric:.4f} @ {ls.best_step})" if ls.best_metric is not None else ""
