"""Shared tiny fixtures: a random tiny BERT, a synthetic task, and a teacher fine-tuned on it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import base_args, make_task, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths: model (random tiny BERT), train/dev csv, teacher (fine-tuned), root."""
    from cofi.cli import main

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    train, dev = make_task(root / "data", n_train=256, n_eval=64)
    teacher_out = root / "teacher"
    rc = main(["finetune"] + base_args(model, train, dev, teacher_out, epochs=4, learning_rate=2e-3, batch_size=16,
                                       eval_steps=16, logging_steps=8))
    assert rc == 0
    return {"root": root, "model": model, "train": train, "dev": dev, "teacher": teacher_out / "best"}
