"""Evaluate an opened model folder (``model_folder.EvalModel``) on a data set: the task spec it is
scored under (its remembered task, overridden by explicit columns), the data with every column and
label checked against the model, and the metrics. Used by ``cofi eval`` and ``cofi demo``."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..data import (
    TaskError,
    TaskSpec,
    compute_metrics,
    encode_classification,
    get_spec,
    label_map_from_record,
    labels_from,
    load_task,
    read_table,
    spec_from_record,
)
from ..data.task_record import check_record
from ..data.tasks import check_texts, first_line_of_row
from .model_folder import EvalModel


def _record(em: EvalModel, required: bool) -> dict[str, Any] | None:
    """The folder's task record; a damaged one is refused when ``required`` (no --task), else ignored."""
    try:
        return check_record(em.task_record, f"{em.path}/config.json", "task_spec" if em.kind == "compact" else "cofi_task")
    except TaskError:
        if required:
            raise
        return None


def eval_spec(em: EvalModel, *, task: str | None = None, text_fields: Sequence[str] | None = None,
              label_field: str | None = None, num_labels: int | None = None, who: str = "cofi eval") -> TaskSpec:
    """The spec to score ``em`` under: ``task`` (default: the task the folder remembers) with the
    remembered columns unless ``text_fields`` / ``label_field`` are given; the class count is the
    model's (``num_labels``, when given, must agree)."""
    rec = _record(em, required=task is None)
    if task is None and rec is None:
        raise TaskError(f"{who}: --task is needed: {em.path} does not record the task it was trained on "
                        "(a folder from an older cofi); e.g. --task custom --eval-file FILE --text-fields COL "
                        "--label-field COL")
    from_record = rec is not None and (task is None or task == rec["name"])
    if from_record:
        spec = spec_from_record(rec, text_fields=text_fields, label_field=label_field)
    else:
        spec = get_spec(task, text_fields=text_fields, label_field=label_field)
    if spec.kind == "qa":
        raise TaskError(f"{who}: --task {spec.name} is question answering, which cofi eval does not evaluate "
                        "(use a classification or regression task)")
    n = em.num_labels
    if num_labels is not None and num_labels != (1 if spec.kind == "regression" else n):
        raise TaskError(f"{who}: --num-labels {num_labels} but the model in {em.path} has {n} output(s)")
    if spec.kind == "regression" and n != 1:
        raise TaskError(f"{who}: --task {spec.name} is a regression but the model has {n} outputs")
    if spec.kind == "classification":
        if n == 1:
            raise TaskError(f"{who}: the model has one output (a regression model) but --task {spec.name} "
                            "is a classification")
        if not from_record and spec.name != "custom" and spec.num_labels != n:
            raise TaskError(f"{who}: --task {spec.name} has {spec.num_labels} classes but the model has "
                            f"num_labels={n}")
        spec = dataclasses.replace(spec, num_labels=n)  # the data's labels must be the model's classes
    return spec


def eval_data(spec: TaskSpec, *, eval_file: str | None = None, eval_split: str | None = None,
              who: str = "cofi eval") -> tuple[Any, str, int | None]:
    """``(dataset, where, first file line of row 0)``: ``eval_file``, or the task's own ``eval_split``.
    Missing columns, no rows and empty text cells are refused (one line naming the option to set)."""
    if eval_file is not None:
        ds, where, first = read_table(eval_file), str(eval_file), first_line_of_row(eval_file)
    elif spec.name == "custom":
        raise TaskError(f"{who}: task 'custom' has no data of its own: give --eval-file FILE")
    else:
        _, ds = load_task(spec, eval_split=eval_split)
        where, first = f"{spec.name} {eval_split or spec.eval_split} split", None
    need = list(spec.text_fields) + [spec.label_field]
    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise TaskError(f"{who}: {where} lacks column(s) {missing}; it has {ds.column_names} (set --text-fields "
                        f"and --label-field; the model expects text {list(spec.text_fields)}, label "
                        f"{spec.label_field!r})")
    if len(ds) == 0:
        raise TaskError(f"{who}: {where} has no rows")
    check_texts(spec, ds, where=where, first_line=first)
    return ds, where, first


def label_map_for(em: EvalModel, spec: TaskSpec, train_file: str | None = None) -> dict[str, int] | None:
    """Label name -> class id as in training: the folder's recorded names, else the sorted names of
    ``train_file`` (folders from an older cofi); None when the labels are integer class ids."""
    m = label_map_from_record(_record(em, required=False))
    if m is not None or train_file is None or spec.kind != "classification":
        return m
    train = read_table(train_file)
    if spec.label_field not in train.column_names:
        raise TaskError(f"cofi eval: --train-file {train_file} lacks the label column {spec.label_field!r}; it has "
                        f"{train.column_names} (set --label-field)")
    _, m = labels_from(spec, train[spec.label_field], where=f"--train-file {train_file}",
                       first_line=first_line_of_row(train_file))
    return m


def check_labels(spec: TaskSpec, ds, label_map: dict[str, int] | None, where: str, first: int | None,
                 model_dir: str, train_file: str | None = None) -> None:
    """Every label of ``ds`` a class of the model (integer ids in range, or known names)."""
    try:
        labels_from(spec, ds[spec.label_field], label_map, where=where, first_line=first,
                    names_allowed=label_map is not None)
    except TaskError as e:
        msg = str(e)
        if "outside [0," in msg:
            msg = msg.split(": task ")[0] + (f": the model in {model_dir} has {spec.num_labels} classes (check "
                                              "--label-field, or evaluate a model trained on these classes)")
        elif label_map is None and train_file is None and "is a name" in msg:
            msg += ("; the model folder records no label names: give --train-file (its training data) so names "
                    "map to class ids as in training")
        raise TaskError(msg) from None


def score(em: EvalModel, spec: TaskSpec, ds, tokenizer, *, max_length: int, batch_size: int,
          label_map: dict[str, int] | None) -> dict[str, Any]:
    """``{"n": examples, <metric>: value, ...}`` of ``em`` on ``ds`` (labels already checked)."""
    import numpy as np

    from .inference import predict

    enc = encode_classification(spec, ds, tokenizer, max_length, label_map=label_map)
    feats = [{"input_ids": ids, **({"token_type_ids": enc.token_type_ids[i]} if enc.token_type_ids else {})}
             for i, ids in enumerate(enc.input_ids)]
    logits = predict(em.model, feats, batch_size=batch_size, pad_token_id=enc.pad_id)["logits"]
    preds = logits[:, 0].numpy() if spec.kind == "regression" else logits.argmax(-1).numpy()
    return {"n": len(feats), **compute_metrics(spec.metrics, preds, np.asarray(enc.labels))}
