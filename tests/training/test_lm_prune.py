"""``cofi prune-lm`` on a tiny random Llama (GQA, tied head) and tiny text: the delivered masks meet
the target (sparsity within 0.005 from above, or exactly the shape, a stock Llama), the LM loss goes
down, the fold equals the masked model, a killed run resumed gives bitwise the same result, and
mistakes are one line."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from cofi.training.lm_prune import LMPruneConfig, LMPruner
from safetensors.torch import load_file
from tiny_llama import WORDS, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(d, hidden=64, heads=8, kv_heads=2, intermediate=128, max_positions=64)
    rng = random.Random(0)
    text = d / "text.txt"  # a learnable pattern: runs of consecutive words
    lines = []
    for _ in range(300):
        s = rng.randrange(25)
        lines.append(" ".join(WORDS[s:s + 5]))
    text.write_text("\n".join(lines))
    return d, text


def _cfg(tiny, out: Path, **kw) -> LMPruneConfig:
    model, text = tiny
    base = {"model": str(model), "output_dir": str(out), "train_text": str(text), "seq_len": 32, "batch_size": 4, "max_steps": 16,
                "lagrangian_warmup_steps": 8, "learning_rate": 3e-3, "reg_learning_rate": 0.1, "kl_weight": 1.0, "ce_weight": 1.0,
                "eval_steps": 8, "eval_batches": 2, "save_steps": 4, "loss_chunk": 40, "num_threads": 1}
    base.update(kw)
    return LMPruneConfig(**base)


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_sparsity_target_loss_fold(tiny, tmp_path):
    res = LMPruner(_cfg(tiny, tmp_path / "r", target_sparsity=0.5, hidden_weight=0.1, max_steps=24), log=lambda m: None).run()
    print(res)
    assert 0.5 <= res["real_sparsity"] <= 0.505
    assert res["fold_max_abs_gap"] < 1e-4
    ce = [r["ce"] for r in _records(tmp_path / "r")]
    assert sum(ce[-4:]) / 4 < sum(ce[:4]) / 4
    assert (tmp_path / "r" / "compact" / "model.safetensors").is_file()


def test_target_shape_is_stock_llama(tiny, tmp_path):
    res = LMPruner(_cfg(tiny, tmp_path / "s", target_hidden=48, target_heads=4, target_kv_heads=1,
                        target_intermediate=64, target_layers=2), log=lambda m: None).run()
    st = res["structure"]
    assert st["hidden"] == 48 and st["query_heads"] == [4, 4] and st["kv_heads"] == [1, 1] and st["intermediate"] == [64, 64]
    assert res["stock_llama"] and res["real_sparsity"] == pytest.approx(res["target_sparsity"], abs=1e-12)
    assert res["fold_max_abs_gap"] < 1e-4


class _Kill(Exception):
    pass


def test_resume_after_kill_is_bitwise(tiny, tmp_path):
    full = LMPruner(_cfg(tiny, tmp_path / "a", target_sparsity=0.4, max_steps=10), log=lambda m: None).run()

    def kill(step: int) -> None:
        if step == 7:
            raise _Kill

    with pytest.raises(_Kill):
        LMPruner(_cfg(tiny, tmp_path / "b", target_sparsity=0.4, max_steps=10), log=lambda m: None, on_step=kill).run()
    res = LMPruner(_cfg(tiny, tmp_path / "b", target_sparsity=0.4, max_steps=10), resume=True, log=lambda m: None).run()
    assert res == full
    for f in ("masks.safetensors", "compact/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / f)), load_file(str(tmp_path / "b" / f))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _records(tmp_path / "b")] == list(range(1, 11))


def _cli(capsys, *args: str) -> tuple[int, str]:
    from cofi.cli import main

    rc = main(["prune-lm", *args])
    return rc, capsys.readouterr().err


def test_mistakes_are_one_line(tiny, tmp_path, capsys):
    model, text = tiny
    common = ["--model", str(model), "--train-text", str(text)]
    rc, err = _cli(capsys, *common, "--output-dir", str(tmp_path / "x"), "--target-sparsity", "0.5", "--target-layers", "1")
    assert rc == 2 and err.count("\n") == 1 and "either --target-sparsity or a target shape" in err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("x")
    rc, err = _cli(capsys, *common, "--output-dir", str(tmp_path / "y"), "--target-sparsity", "0.5")
    assert rc == 2 and "is not empty" in err and err.count("\n") == 1
    rc, err = _cli(capsys, *common, "--output-dir", str(tmp_path / "z"), "--target-heads", "3", "--target-kv-heads", "2")
    assert rc == 2 and "multiple of num_kv_heads" in err and err.count("\n") == 1
    rc, err = _cli(capsys, *common, "--output-dir", str(tmp_path / "w"), "--resume", "--target-sparsity", "0.5")
    assert rc == 2 and "holds no prune-lm run" in err and err.count("\n") == 1
