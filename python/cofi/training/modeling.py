"""Model loading for training: CoFi masked models (cofi.models) for students and teachers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


class ModelLoadError(UserError):
    pass


def _model_type(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.exists():
            raise ModelLoadError(f"cofi: {p} has no config.json (not a model folder)")
        mt = json.loads(cfg.read_text()).get("model_type", "bert")
    elif p.exists():
        raise ModelLoadError(f"cofi: {p} is a file; give a model folder or a hub name")
    else:
        if "/" not in path and not path.replace("-", "").replace("_", "").isalnum():
            raise ModelLoadError(f"cofi: model {path!r} not found")
        from transformers import AutoConfig

        try:
            mt = AutoConfig.from_pretrained(path).model_type
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cofi: model {path!r} not found locally and not loadable from the hub: {e}") from e
    return mt


def model_class(path: str, qa: bool):
    try:
        from .. import models
    except ImportError as e:  # pragma: no cover - package lands separately
        raise ModelLoadError(f"cofi: cofi.models is not available ({e})") from e
    mt = _model_type(path)
    names = {("bert", False): "CoFiBertForSequenceClassification", ("bert", True): "CoFiBertForQuestionAnswering",
             ("roberta", False): "CoFiRobertaForSequenceClassification",
             ("roberta", True): "CoFiRobertaForQuestionAnswering"}
    if (mt, qa) not in names:
        raise ModelLoadError(f"cofi: model type {mt!r} is not supported (bert, roberta)")
    return getattr(models, names[(mt, qa)])


def load_model(path: str, *, qa: bool, num_labels: int, dropout: float | None = None) -> torch.nn.Module:
    cls = model_class(path, qa)
    kw: dict[str, Any] = {}
    if not qa:
        kw["num_labels"] = num_labels
    if dropout is not None:
        kw["hidden_dropout_prob"] = dropout
        kw["attention_probs_dropout_prob"] = dropout
    try:
        return cls.from_pretrained(path, **kw)
    except TypeError:
        # loaders that do not forward config overrides: set dropout after loading
        kw.pop("hidden_dropout_prob", None)
        kw.pop("attention_probs_dropout_prob", None)
        m = cls.from_pretrained(path, **kw)
        if dropout is not None:
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = dropout
        return m
