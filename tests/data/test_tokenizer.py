"""A model folder without tokenizer files used to be read with transformers' special-tokens-only
fallback: every word [UNK], a chance-level score and no warning (cofi eval, finetune, prune). Now such
a folder is refused, and ``--tokenizer`` / the ``tokenizer`` config key take the tokenizer from elsewhere."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "training"))
from _tiny import WORDS, base_args, make_task, make_tiny_model  # noqa: E402

from cofi import data as D  # noqa: E402
from cofi.cli import main  # noqa: E402


def _strip_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in os.listdir(dst):
        if "tok" in f or "vocab" in f or "special" in f:
            os.remove(dst / f)
    return dst


def _bert_tokenizer(words: list[str]):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


class TestLoadTokenizer:
    def test_folder_without_tokenizer_files(self, tmp_path):
        src = make_tiny_model(tmp_path / "m")
        bare = _strip_tokenizer(src, tmp_path / "bare")
        with pytest.raises(D.TokenizerError, match="has no tokenizer files .* --tokenizer PATH"):
            D.load_tokenizer(bare)
        tok = D.load_tokenizer(bare, tokenizer=src)
        assert len(tok) == 5 + len(WORDS) and tok.convert_tokens_to_ids("good") != tok.unk_token_id

    def test_vocabulary_must_fit_the_model(self, tmp_path):
        src = make_tiny_model(tmp_path / "m")
        n = 5 + len(WORDS)
        big = tmp_path / "big"
        _bert_tokenizer([f"x{i}" for i in range(100)]).save_pretrained(str(big))
        with pytest.raises(D.TokenizerError, match=f"105 tokens but the model's vocab_size is {n}"):
            D.load_tokenizer(src, tokenizer=big)
        small = tmp_path / "small"
        _bert_tokenizer(WORDS[:5]).save_pretrained(str(small))
        with pytest.raises(D.TokenizerError, match=f"10 tokens, far fewer than the model's vocab_size {n}"):
            D.load_tokenizer(src, tokenizer=small)
        only_special = tmp_path / "special"
        _bert_tokenizer([]).save_pretrained(str(only_special))
        with pytest.raises(D.TokenizerError, match="only its 5 special tokens"):
            D.load_tokenizer(src, tokenizer=only_special, vocab_size=5)
        with pytest.raises(D.TokenizerError, match="no such folder"):
            D.load_tokenizer(src, tokenizer=tmp_path / "nope")
        assert len(D.load_tokenizer(src)) == n


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny model fine-tuned to ~100% from a folder WITHOUT tokenizer files (``--tokenizer``)."""
    root = tmp_path_factory.mktemp("tok")
    hf = make_tiny_model(root / "hf", layers=2)
    bare = _strip_tokenizer(hf, root / "bare")
    train, dev = make_task(root / "task", n_train=256, n_eval=64)
    args = base_args(bare, train, dev, root / "ft") + ["--max-steps", "120", "--batch-size", "16",
                                                      "--learning-rate", "1e-3", "--eval-steps", "60"]
    return {"root": root, "hf": hf, "bare": bare, "train": train, "dev": dev, "args": args}


def test_finetune_refuses_folder_without_tokenizer_and_takes_tokenizer_option(trained, capsys):
    assert main(["finetune", *trained["args"]]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    assert main(["finetune", *trained["args"], "--tokenizer", str(trained["hf"])]) == 0
    best = trained["root"] / "ft" / "best"
    out = capsys.readouterr().out
    assert float(out.split("finetune done: best ")[1].split(" ->")[0]) > 0.95, out  # the [UNK] run reached 0.56
    # the tokenizer written next to the best weights is the full one, not the 5-token fallback
    assert len(D.load_tokenizer(best)) == 5 + len(WORDS)


def test_eval_compact_without_tokenizer(trained, capsys):
    from transformers import BertForSequenceClassification

    from cofi.pruning import prune

    best = trained["root"] / "ft" / "best"
    if not best.exists():
        pytest.skip("needs test_finetune_refuses_folder_without_tokenizer_and_takes_tokenizer_option")
    model = BertForSequenceClassification.from_pretrained(str(best)).eval()
    c = model.config
    ones = {"hidden": torch.ones(c.hidden_size), "head": torch.ones(c.num_hidden_layers, c.num_attention_heads),
            "mha": torch.ones(c.num_hidden_layers), "intermediate": torch.ones(c.num_hidden_layers, c.intermediate_size),
            "ffn": torch.ones(c.num_hidden_layers)}
    compact = trained["root"] / "compact"
    prune(model, ones).save_pretrained(str(compact))  # no tokenizer given: none written
    ev = ["eval", str(compact), "--task", "custom", "--train-file", str(trained["train"]),
          "--eval-file", str(trained["dev"])]
    assert main(ev) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    assert main([*ev, "--tokenizer", str(best)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.95  # the [UNK] fallback scored ~0.5


def test_prune_compact_folders_carry_the_tokenizer(trained, capsys):
    best = trained["root"] / "ft" / "best"
    if not best.exists():
        pytest.skip("needs test_finetune_refuses_folder_without_tokenizer_and_takes_tokenizer_option")
    student = _strip_tokenizer(best, trained["root"] / "student")
    out = trained["root"] / "prune"
    args = base_args(student, trained["train"], trained["dev"], out) + [
        "--teacher", str(best), "--tokenizer", str(trained["hf"]), "--max-steps", "4", "--prepruning-steps", "0",
        "--lagrangian-warmup-steps", "2", "--eval-steps", "2", "--compact-max-steps", "2", "--target-sparsity", "0.2",
        "--sparsity-epsilon", "0.5", "--max-eval-samples", "16"]
    assert main(["prune", *args]) == 0
    capsys.readouterr()
    for d in ("compact", "compact_folded"):
        assert len(D.load_tokenizer(out / d)) == 5 + len(WORDS), d
    assert main(["eval", str(out / "compact"), "--task", "custom", "--train-file", str(trained["train"]),
                 "--eval-file", str(trained["dev"]), "--limit", "8"]) == 0
