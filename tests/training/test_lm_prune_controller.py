"""The decoder's Lagrangian controller (``cofi prune-lm``): a warm-up too short for log_alpha to
travel at reg_learning_rate gets the encoder's raised rate (``optim.controller_lr``), and the
expected sparsity then reaches the target by the end of a 30-step warm-up; the lambdas ascend
(lambda_1 moves with the sign of expected - target, lambda_2 never falls); a rate given on the
command line is kept."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
from cofi.training.lm_prune import LMPruneConfig, LMPruner
from cofi.training.optim import CROSSINGS
from tiny_llama import WORDS, save_tiny_llama

WARM = 30
TRAVEL = 9.210340371976184  # init mean 5 clamped to log 1e2, down to log 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(d, hidden=64, heads=8, kv_heads=2, intermediate=128, max_positions=64)
    rng = random.Random(0)
    (d / "text.txt").write_text("\n".join(" ".join(WORDS[s:s + 5]) for s in (rng.randrange(25) for _ in range(300))))
    return d, d / "text.txt"


def _run(tiny, out: Path, **kw) -> tuple[dict, list[dict]]:
    model, text = tiny
    cfg = dict(model=str(model), output_dir=str(out), train_text=str(text), seq_len=32, batch_size=4, max_steps=WARM,
               lagrangian_warmup_steps=WARM, target_sparsity=0.5, learning_rate=3e-3, kl_weight=1.0, ce_weight=1.0,
               eval_steps=1000, eval_batches=1, save_steps=1000, loss_chunk=40, num_threads=1)
    cfg.update(kw)
    res = LMPruner(LMPruneConfig(**cfg), log=lambda m: None).run()
    return res, [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_warmup_reaches_the_target_and_lambdas_ascend(tiny, tmp_path):
    res, recs = _run(tiny, tmp_path / "a")
    c = res["controller"]
    assert c["adapted"] and c["configured"] == 0.1 and c["travel"] == pytest.approx(TRAVEL)
    assert c["effective"] == pytest.approx(CROSSINGS * TRAVEL / WARM)
    assert abs(recs[-1]["expected_sparsity"] - 0.5) <= 0.05
    for prev, r in zip(recs, recs[1:]):
        d = r["expected_sparsity"] - r["target_sparsity"]
        if abs(d) > 1e-3:  # ascent: L_c = l1 d + l2 d^2 is maximised over the lambdas
            assert (r["lambda_1"] - prev["lambda_1"]) * d > 0, r["step"]
        assert r["lambda_2"] >= prev["lambda_2"]


def test_a_given_rate_is_kept(tiny, tmp_path):
    from cofi.training.cli_prune_lm import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--model", "m", "--output-dir", "o", "--target-sparsity", "0.5"]
    cfg = config_from_args(p.parse_args(base))
    assert cfg.reg_learning_rate == 0.1 and cfg.reg_learning_rate_adapt
    cfg = config_from_args(p.parse_args(base + ["--reg-learning-rate", "0.1"]))
    assert cfg.reg_learning_rate == 0.1 and not cfg.reg_learning_rate_adapt
    model, text = tiny
    cfg = LMPruneConfig(model=str(model), output_dir=str(tmp_path / "g"), train_text=str(text), seq_len=32,
                        max_steps=WARM, target_sparsity=0.5, reg_learning_rate_adapt=False)
    pruner = LMPruner(cfg, log=lambda m: None)
    assert pruner.controller["effective"] == 0.1 and not pruner.controller["adapted"]
    assert all(g["lr"] == 0.1 for o in (pruner.optim.l0_opt, pruner.optim.lam_opt) for g in o.param_groups)
