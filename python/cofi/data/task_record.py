"""What a model folder remembers about the task it was trained on (``cofi_task`` in config.json).

Training writes the record into the model's config (``remember_task``): the task name and kind, its
text and label columns, the number of classes and, when the training labels were names, the names
in id order (training maps sorted names to 0, 1, ...). ``cofi eval`` reads it back
(``spec_from_record``, ``label_map_from_record``) so a folder evaluates on the user's own columns
and labels without flags.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tasks import TaskError, TaskSpec, get_spec

RECORD_KEY = "cofi_task"
BASE_KEY = "cofi_base_model"


def task_record(spec: TaskSpec, label_map: Mapping[str, int] | None) -> dict[str, Any]:
    """JSON-able record of ``spec`` and the training data's label name -> id map (None: integer ids)."""
    names = None
    if label_map:
        names = [n for n, _ in sorted(label_map.items(), key=lambda kv: kv[1])]
    return {"name": spec.name, "kind": spec.kind, "text_fields": list(spec.text_fields),
            "label_field": spec.label_field, "num_labels": int(spec.num_labels), "metrics": list(spec.metrics),
            "primary": spec.primary, "label_names": names}


def remember_task(hf_config: Any, spec: TaskSpec, label_map: Mapping[str, int] | None,
                  base_model: str | None = None) -> None:
    """Store the record on a transformers config (saved with it); label names become ``id2label``;
    ``base_model`` (the pre-trained model a run started from) is kept as ``cofi_base_model`` unless
    the config already names one (a teacher's config names the model it was fine-tuned from)."""
    rec = task_record(spec, label_map)
    setattr(hf_config, RECORD_KEY, rec)
    if base_model and not getattr(hf_config, BASE_KEY, None):
        setattr(hf_config, BASE_KEY, str(base_model))
    if rec["label_names"] and len(rec["label_names"]) == getattr(hf_config, "num_labels", -1):
        hf_config.id2label = dict(enumerate(rec["label_names"]))
        hf_config.label2id = {n: i for i, n in enumerate(rec["label_names"])}


def check_record(rec: object, where: str, key: str = RECORD_KEY) -> dict[str, Any] | None:
    """``rec`` when it is a well-formed record, None when absent; a damaged one is a TaskError."""
    if rec is None:
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("label_field"), str)
          and isinstance(rec.get("text_fields"), list) and 1 <= len(rec["text_fields"]) <= 2
          and all(isinstance(t, str) and t for t in rec["text_fields"])
          and isinstance(rec.get("num_labels"), int) and rec.get("kind") in ("classification", "regression", "qa"))
    names = rec.get("label_names") if isinstance(rec, dict) else None
    if ok and names is not None:
        ok = isinstance(names, list) and len(names) == rec["num_labels"] and all(isinstance(n, str) for n in names) \
            and len(set(names)) == len(names)
    if not ok:
        raise TaskError(f"cofi: {where}: {key} is damaged (expected name, kind, text_fields, label_field, "
                        f"num_labels, label_names); give --task, --text-fields and --label-field instead")
    return rec


def spec_from_record(rec: Mapping[str, Any], *, text_fields=None, label_field: str | None = None) -> TaskSpec:
    """The recorded task's spec (its registry entry with the recorded columns and class count);
    explicit ``text_fields`` / ``label_field`` win."""
    return get_spec(rec["name"], text_fields=text_fields or rec["text_fields"],
                    label_field=label_field or rec["label_field"], num_labels=rec["num_labels"],
                    kind="regression" if rec["kind"] == "regression" else None)


def label_map_from_record(rec: Mapping[str, Any] | None) -> dict[str, int] | None:
    """Training's label name -> id map, or None when the labels were integer class ids."""
    names = rec.get("label_names") if rec else None
    return {n: i for i, n in enumerate(names)} if names else None
