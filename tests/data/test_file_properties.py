"""Property tests of the label file formats: a csv/tsv/jsonl/json file with random labels is either
read back as exactly the labels written, or refused with one TaskError; never shifted or truncated."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cofi import data as D
from cofi.errors import UserError

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NAMES = ["pos", "neg", "neutral", "good", "bad"]
FORMATS = ["csv", "tsv", "jsonl", "json"]

# one label cell: ("int", k) | ("name", s) | ("empty", None) | ("float", x non-integral) | ("bool", b)
cell = st.one_of(
    st.tuples(st.just("int"), st.integers(-3, 7)),
    st.tuples(st.just("name"), st.sampled_from(NAMES)),
    st.tuples(st.just("empty"), st.none()),
    st.tuples(st.just("float"), st.floats(-5, 9, allow_nan=False).filter(lambda x: not float(x).is_integer())),
    st.tuples(st.just("bool"), st.booleans()),
)


def _text_value(kind: str, v: object) -> str:
    if kind == "empty":
        return ""
    return repr(v) if kind == "float" else str(v)


def _json_value(kind: str, v: object) -> object:
    return None if kind == "empty" else v


def write(path: Path, fmt: str, cells: list[tuple[str, object]]) -> None:
    sentences = [f"w{i} good" for i in range(len(cells))]
    if fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(["sentence", "label"])
        w.writerows([s, _text_value(k, v)] for s, (k, v) in zip(sentences, cells))
        path.write_text(buf.getvalue())
    else:
        rows = [{"sentence": s, "label": _json_value(k, v)} for s, (k, v) in zip(sentences, cells)]
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if fmt == "jsonl" else json.dumps(rows))


def expected(cells: list[tuple[str, object]], num_labels: int, fmt: str) -> tuple[str, object] | None:
    """("ids", [...]) | ("names", [...]) for a valid file; None when it must be refused."""
    kinds = {k for k, _ in cells}
    if fmt in ("csv", "tsv"):  # a column of only True/False reads as booleans, else they are names
        if kinds == {"bool"}:
            return None
        cells = [("name", str(v)) if k == "bool" else (k, v) for k, v in cells]
        kinds = {k for k, _ in cells}
    if kinds & {"empty", "float", "bool"} or kinds == {"int", "name"}:
        return None
    if kinds == {"int"}:
        ids = [v for _, v in cells]
        return ("ids", ids) if all(0 <= i < num_labels for i in ids) else None
    names = [v for _, v in cells]
    return ("names", names) if len(set(names)) <= num_labels else None


@SETTINGS
@given(cells=st.lists(cell, min_size=1, max_size=12), num_labels=st.integers(2, 5), fmt=st.sampled_from(FORMATS))
def test_labels_read_exactly_or_refused(cells, num_labels, fmt):
    spec = D.get_spec("custom", num_labels=num_labels)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"data.{fmt}"
        write(p, fmt, cells)
        want = expected(cells, num_labels, fmt)
        try:
            train, _ = D.load_task(spec, train_file=str(p), eval_file=str(p))
            labels, label_map = D.labels_from(spec, train["label"])
        except UserError as e:
            assert want is None, (cells, fmt, str(e))
            assert "\n" not in str(e) and (str(p) in str(e) or "distinct label names" in str(e))
            return
        assert want is not None, (cells, fmt, labels)
        kind, values = want
        if kind == "ids":
            assert label_map is None and labels.tolist() == values
        else:
            inverse = {i: n for n, i in label_map.items()}
            assert [inverse[i] for i in labels.tolist()] == values
            assert sorted(label_map) == sorted(set(values))


@SETTINGS
@given(cells=st.lists(st.one_of(st.floats(-1e6, 1e6, allow_nan=False, width=32), st.none(), st.just("x")),
                      min_size=1, max_size=10),
       fmt=st.sampled_from(FORMATS))
def test_regression_targets_read_exactly_or_refused(cells, fmt):
    spec = D.get_spec("custom", kind="regression")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"data.{fmt}"
        kinds = [("empty", None) if v is None else ("name", v) if isinstance(v, str) else ("float", v) for v in cells]
        write(p, fmt, kinds)
        valid = all(isinstance(v, float) for v in cells)
        try:
            train, _ = D.load_task(spec, train_file=str(p), eval_file=str(p))
            targets, _ = D.labels_from(spec, train["label"])
        except UserError as e:
            assert not valid, (cells, fmt, str(e))
            assert str(p) in str(e) and "row" in str(e)
            return
        assert valid, (cells, fmt, targets)
        np.testing.assert_array_equal(targets, np.asarray(cells, dtype=np.float32))


@SETTINGS
@given(n_train=st.integers(1, 6), bad_row=st.integers(0, 5), bad=st.sampled_from(["", "x", "1.5", "-1", "9"]))
def test_refusal_names_file_row_and_value(n_train, bad_row, bad):
    bad_row = min(bad_row, n_train - 1)
    cells = [str(i % 2) for i in range(n_train)]
    cells[bad_row] = bad
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "t.csv"
        p.write_text("sentence,label\n" + "".join(f"w{i},{c}\n" for i, c in enumerate(cells)))
        spec = D.get_spec("custom")
        if bad == "x" and n_train == 1:
            D.load_task(spec, train_file=str(p), eval_file=str(p))  # one name alone is a valid label set
            return
        with pytest.raises(D.TaskError) as e:
            D.load_task(spec, train_file=str(p), eval_file=str(p))
        msg = str(e.value)
        assert str(p) in msg and f"row {bad_row + 1} (line {bad_row + 2})" in msg and repr(
            int(bad) if bad.lstrip("-").isdigit() else float(bad) if bad == "1.5" else bad) in msg


def test_shifted_labels_regression(tmp_path):
    """One empty cell used to turn the column into string ids ('' -> 0, '0' -> 1, '1' -> 2)."""
    p = tmp_path / "t.csv"
    p.write_text("sentence,label\na,0\nb,1\nc,\n")
    with pytest.raises(D.TaskError, match=r"t\.csv: row 3 \(line 4\): label '' is empty"):
        D.load_task(D.get_spec("custom"), train_file=str(p), eval_file=str(p))
    p.write_text("sentence,label\na,0\nb,1.7\n")
    with pytest.raises(D.TaskError, match="label 1.7 is not an integer class id"):
        D.load_task(D.get_spec("custom"), train_file=str(p), eval_file=str(p))


def test_eval_names_must_be_training_names(tmp_path):
    tr, ev = tmp_path / "tr.csv", tmp_path / "ev.csv"
    tr.write_text("sentence,label\na,pos\nb,neg\n")
    ev.write_text("sentence,label\na,pos\nb,neutral\n")
    with pytest.raises(D.TaskError, match=r"ev\.csv: row 2 \(line 3\): label 'neutral' is not a label of the training"):
        D.load_task(D.get_spec("custom"), train_file=str(tr), eval_file=str(ev))
    ev.write_text("sentence,label\na,pos\n")  # a subset of the training names keeps the training ids
    train, dev = D.load_task(D.get_spec("custom"), train_file=str(tr), eval_file=str(ev))
    _, m = D.labels_from(D.get_spec("custom"), train["label"])
    assert D.labels_from(D.get_spec("custom"), dev["label"], m)[0].tolist() == [1]


def test_regression_keeps_floats(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("sentence\tlabel\na\t1.7\nb\t-0.25\nc\t3\n")
    spec = D.get_spec("custom", kind="regression")
    train, _ = D.load_task(spec, train_file=str(p), eval_file=str(p))
    y, _ = D.labels_from(spec, train["label"])
    assert y.dtype == np.float32 and y.tolist() == [np.float32(1.7), -0.25, 3.0] and not math.isnan(y.sum())
