"""Tiny random BERT + a synthetic sentence task for fast end-to-end training tests."""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

WORDS = [f"w{i}" for i in range(40)] + ["good", "great", "bad", "awful"]


def make_tiny_model(d: Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64) -> Path:
    """A random BertForSequenceClassification + WordPiece tokenizer saved to ``d``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(str(d))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(str(d))
    return d


def make_task(d: Path, n_train: int = 256, n_eval: int = 64, seed: int = 0, fixed_len: int | None = None) -> tuple[Path, Path]:
    """Sentences of filler words and sentiment words (first word always one); label 1 = positive."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.csv", n_train), ("dev.csv", n_eval)):
        rows = []
        for _ in range(n):
            y = rng.randrange(2)
            k = fixed_len or rng.randint(3, 12)
            senti = ["good", "great"] if y else ["bad", "awful"]
            words = [rng.choice(senti) if rng.random() < 0.4 else rng.choice(WORDS[:40]) for _ in range(k - 1)]
            words.insert(0, rng.choice(senti))
            rows.append({"sentence": " ".join(words), "label": y})
        p = d / name
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, ["sentence", "label"])
            w.writeheader()
            w.writerows(rows)
        paths.append(p)
    return paths[0], paths[1]


def base_args(model: Path, train: Path, dev: Path, out: Path, **kw) -> list[str]:
    args = ["--task", "custom", "--train-file", str(train), "--eval-file", str(dev), "--model", str(model),
            "--output-dir", str(out), "--progress", "false", "--max-seq-length", "32", "--seed", "1",
            "--num-threads", "1"]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args
