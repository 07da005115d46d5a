"""``cofi eval DIR --task ...`` on a compact folder: metric, real parameter count and sparsity,
the same with and without ``--pad`` (padding is exact and is not counted)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "training"))
from _tiny import make_task, make_tiny_model  # noqa: E402
from masked_forward_ref import random_masks  # noqa: E402

from cofi.cli import main  # noqa: E402
from cofi.pruning import prune  # noqa: E402


def test_cli_eval_reports_metric_params_sparsity_padded_or_not(tmp_path, capsys):
    from transformers import AutoTokenizer, BertForSequenceClassification

    src = make_tiny_model(tmp_path / "hf", layers=5, hidden=32, heads=4, ffn=64)
    model = BertForSequenceClassification.from_pretrained(str(src)).eval()
    compact = prune(model, random_masks(model.config, False, 2))
    out = tmp_path / "compact"
    compact.save_pretrained(str(out), tokenizer=AutoTokenizer.from_pretrained(str(src)))
    train, dev = make_task(tmp_path / "task", n_train=8, n_eval=40)
    reports = []
    for pad in ([], ["--pad", "16"]):
        assert main(["eval", str(out), "--task", "custom", "--train-file", str(train), "--eval-file", str(dev),
                     "--batch-size", "7", *pad]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    plain, padded = reports
    assert plain["n"] == 40 and 0.0 <= plain["accuracy"] <= 1.0
    assert plain["encoder_params"] == compact.num_encoder_params() == padded["encoder_params"]
    assert plain["sparsity"] == padded["sparsity"] == compact.sparsity() > 0
    assert plain["hidden_size"] == padded["hidden_size"] == compact.config.hidden_size
    assert padded["padded_hidden_size"] % 16 == 0 and padded["padded_hidden_size"] >= plain["hidden_size"]
    assert plain["accuracy"] == padded["accuracy"]
    torch.testing.assert_close(torch.tensor(plain["sparsity"]), torch.tensor(1 - plain["encoder_params"] / plain["full_encoder_params"]))


def _user_csv(path, rows: list[tuple[str, str]]) -> str:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def test_eval_on_the_users_own_task_from_the_folders_record(tmp_path, capsys):
    """A 4-class CSV with a ``text`` column and label names: finetune and prune remember the columns
    and names, so ``cofi eval DIR --eval-file FILE`` needs no other flag, on the compact folder and
    on the teacher folder alike; the user's mistakes are one line each."""
    import random

    from _tiny import WORDS, base_args

    rng = random.Random(0)
    names = ["abbr", "desc", "loc", "num"]
    keys = {"abbr": "good", "desc": "great", "loc": "bad", "num": "awful"}

    def rows(n):
        return [(" ".join([keys[y]] + rng.sample(WORDS[:40], 4)), y) for y in (rng.choice(names) for _ in range(n))]

    train, dev, test = (_user_csv(tmp_path / f"{s}.csv", rows(n)) for s, n in (("train", 64), ("dev", 16), ("test", 24)))
    from transformers import BertForSequenceClassification

    src = make_tiny_model(tmp_path / "hf")
    BertForSequenceClassification.from_pretrained(str(src), num_labels=4, ignore_mismatched_sizes=True) \
        .save_pretrained(str(src))  # a 4-class head
    common = ["--text-fields", "text", "--num-labels", "4", "--max-steps", "3", "--batch-size", "16"]
    assert main(["finetune", *base_args(src, Path(train), Path(dev), tmp_path / "teacher"), *common]) == 0
    teacher = tmp_path / "teacher" / "best"
    assert main(["prune", *base_args(teacher, Path(train), Path(dev), tmp_path / "prune"), *common,
                 "--teacher", str(teacher), "--prepruning-steps", "0", "--target-sparsity", "0.5",
                 "--compact-max-steps", "2"]) == 0
    capsys.readouterr()
    compact = tmp_path / "prune" / "compact"
    rec = json.loads((compact / "config.json").read_text())
    assert rec["task_spec"]["text_fields"] == ["text"] and rec["task_spec"]["label_names"] == names
    assert rec["id2label"] == {str(i): n for i, n in enumerate(names)}
    card = (compact / "README.md").read_text()  # the model card: the recorded task and the dev score it was picked on
    assert "label column `label`, 4 classes: ['abbr', 'desc', 'loc', 'num']" in card
    assert "- dev (selection split): accuracy" in card and f"base model: `{src}`" in card
    for folder, kind in ((compact, "compact"), (teacher, "full")):
        assert main(["eval", str(folder), "--eval-file", test]) == 0
        r = json.loads(capsys.readouterr().out)
        assert (r["model"], r["n"], r["num_labels"], r["text_fields"]) == (kind, 24, 4, ["text"])
        assert 0 <= r["accuracy"] <= 1
    # mistakes: one line each
    ckpt = next(p for p in (tmp_path / "prune" / "best", tmp_path / "prune" / "final") if p.is_dir())
    wrong_col = _user_csv(tmp_path / "w.csv", [("a", "abbr")])
    Path(wrong_col).write_text(Path(wrong_col).read_text().replace("text,label", "sentence,label"))
    unknown = _user_csv(tmp_path / "u.csv", [("good w1", "abbr"), ("bad w2", "person")])
    ints = _user_csv(tmp_path / "i.csv", [("good w1", "0")])
    for argv, fragment in ((["eval", str(compact), "--eval-file", wrong_col], "lacks column(s) ['text']"),
                           (["eval", str(compact), "--eval-file", unknown], "label 'person' is not a label"),
                           (["eval", str(teacher), "--eval-file", ints], "label 0 is not a label"),
                           (["eval", str(tmp_path / "prune"), "--eval-file", test], "has no config.json"),
                           (["eval", str(ckpt), "--eval-file", test], "pruning checkpoint")):
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], (argv, err)
