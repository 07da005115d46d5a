"""``cofi eval DIR --task ...`` on a compact folder: metric, real parameter count and sparsity,
the same with and without ``--pad`` (padding is exact and is not counted)."""
from __future__ import annotations

import json
import os
import sys

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
