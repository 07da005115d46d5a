"""Task metrics in a few lines of numpy/scipy: accuracy, F1, Matthews, Pearson/Spearman, SQuAD EM/F1.

All functions take 1-D array-likes of predictions and references and return plain floats in [0, 1]
(correlations in [-1, 1]); SQuAD scores are in [0, 100] as the official script reports them.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence

import numpy as np


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = np.asarray(preds), np.asarray(labels)
    return float((p == y).mean()) if len(y) else 0.0


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    p, y = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = float((p & y).sum())
    denom = float(p.sum() + y.sum())
    return 2.0 * tp / denom if denom else 0.0


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (multi-class form, Gorodkin 2004; equals the binary MCC for 2 classes)."""
    p, y = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(p, y)
    idx = {c: i for i, c in enumerate(classes)}
    c = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for a, b in zip(y, p):
        c[idx[a], idx[b]] += 1
    t_k, p_k = c.sum(1), c.sum(0)
    n, correct = c.sum(), np.trace(c)
    cov_yp = correct * n - t_k @ p_k
    cov_pp = n * n - p_k @ p_k
    cov_yy = n * n - t_k @ t_k
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom else 0.0


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or p.std() == 0 or y.std() == 0:
        return 0.0
    return float(pearsonr(p, y)[0])


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or p.std() == 0 or y.std() == 0:
        return 0.0
    return float(spearmanr(p, y)[0])


# ------------------------------------------------------------------ SQuAD (official v1.1 rules)
def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1_tokens(pred: str, gold: str) -> float:
    pt, gt = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = collections.Counter(pt) & collections.Counter(gt)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(pt), same / len(gt)
    return 2 * prec * rec / (prec + rec)


def squad_scores(preds: Sequence[str], golds: Sequence[Iterable[str]]) -> dict[str, float]:
    """Exact match and token F1 (max over gold answers), each in [0, 100]."""
    em = f1 = 0.0
    for p, g in zip(preds, golds):
        g = list(g) or [""]
        em += max(float(normalize_answer(p) == normalize_answer(x)) for x in g)
        f1 += max(_f1_tokens(p, x) for x in g)
    n = max(len(preds), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: Sequence[str], preds, labels) -> dict[str, float]:
    """Compute each named classification/regression metric."""
    out = {}
    for n in names:
        if n not in METRICS:
            raise ValueError(f"cofi.data.metrics: unknown metric {n!r}; known: {sorted(METRICS)}")
        out[n] = METRICS[n](preds, labels)
    return out
