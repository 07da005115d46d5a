"""Model loading for training: CoFi masked models (cofi.models) for students and teachers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, first_line, read_json_object


class ModelLoadError(UserError):
    pass


def _model_type(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            what = "is empty" if not any(p.iterdir()) else "has no config.json"
            raise ModelLoadError(f"cofi: model folder {p} {what} (not a transformers model folder)")
        d = read_json_object(cfg, ModelLoadError, "cofi")
        if "num_heads" in d and "cofi_format" in d:
            raise ModelLoadError(f"cofi: {p} is a compact (pruned) model folder; finetune/prune start from a "
                                 "transformers model folder (evaluate compact folders with cofi eval)")
        mt = d.get("model_type", "bert")
    elif p.exists():
        raise ModelLoadError(f"cofi: {p} is a file; give a model folder or a hub name")
    else:
        if "/" not in path and not path.replace("-", "").replace("_", "").isalnum() or path.count("/") > 1 \
                or path.startswith((".", "/", "~")):
            raise ModelLoadError(f"cofi: model {path!r} not found")
        from transformers import AutoConfig

        try:
            mt = AutoConfig.from_pretrained(path).model_type
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cofi: model {path!r} not found locally and not loadable from the hub: "
                                 f"{first_line(e)}") from e
    return mt


def model_class(path: str, qa: bool):
    from .. import models
    mt = _model_type(path)
    names = {("bert", False): "CoFiBertForSequenceClassification", ("bert", True): "CoFiBertForQuestionAnswering",
             ("roberta", False): "CoFiRobertaForSequenceClassification",
             ("roberta", True): "CoFiRobertaForQuestionAnswering"}
    if (mt, qa) not in names:
        raise ModelLoadError(f"cofi: model type {mt!r} is not supported (bert, roberta)")
    return getattr(models, names[(mt, qa)])


def _from_pretrained(cls, path: str, kw: dict[str, Any]) -> torch.nn.Module:
    """``cls.from_pretrained`` with every failure to read the user's folder as one ModelLoadError."""
    try:
        return cls.from_pretrained(path, **kw)
    except TypeError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = first_line(e)
        if "mismatched_sizes" in msg or "size mismatch" in msg:
            msg = (f"weights and config.json disagree in shape, or the task head has another number of labels "
                   f"than num_labels={kw.get('num_labels')} ({msg})")
        raise ModelLoadError(f"cofi: cannot load model {path}: {type(e).__name__}: {msg}") from e
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError and other reader errors
        if type(e).__module__.split(".")[0] not in ("safetensors", "huggingface_hub", "pydantic"):
            raise
        raise ModelLoadError(f"cofi: cannot load model {path}: {type(e).__name__}: {first_line(e)} "
                             "(the weights file is damaged or truncated)") from e


def load_model(path: str, *, qa: bool, num_labels: int, dropout: float | None = None,
               max_length: int | None = None) -> torch.nn.Module:
    """The CoFi model class for ``path``'s model type, loaded; refuses (one-line
    :class:`ModelLoadError`) unreadable folders, weights that do not fit, NaN/inf weights and a
    ``max_length`` longer than the model's position table."""
    from ..runtime.modeling import nonfinite_tensor

    cls = model_class(path, qa)
    kw: dict[str, Any] = {}
    if not qa:
        kw["num_labels"] = num_labels
    if dropout is not None:
        kw["hidden_dropout_prob"] = dropout
        kw["attention_probs_dropout_prob"] = dropout
    try:
        m = _from_pretrained(cls, path, kw)
    except TypeError:
        # loaders that do not forward config overrides: set dropout after loading
        kw.pop("hidden_dropout_prob", None)
        kw.pop("attention_probs_dropout_prob", None)
        try:
            m = _from_pretrained(cls, path, kw)
        except TypeError as e:  # e.g. config.json values of the wrong type
            raise ModelLoadError(f"cofi: cannot load model {path}: {first_line(e)}") from e
        if dropout is not None:
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = dropout
    bad = nonfinite_tensor([*m.named_parameters(), *m.named_buffers()])
    if bad:
        raise ModelLoadError(f"cofi: model {path}: tensor {bad[0]!r} has {bad[1]} NaN/inf value(s): the weights "
                             "are broken (a diverged run or a damaged file); refusing to train from them")
    if max_length is not None:
        c = m.config
        positions = c.max_position_embeddings - ((c.pad_token_id or 0) + 1 if c.model_type == "roberta" else 0)
        if max_length > positions:
            raise ModelLoadError(f"cofi: max_seq_length {max_length} exceeds the {positions} positions of model "
                                 f"{path} (max_position_embeddings={c.max_position_embeddings}); set max_seq_length "
                                 f"<= {positions}")
    return m
