"""``cofi prune-lm --domains`` with dynamic batch loading on a tiny random Llama and two tiny text
domains (a learnable word pattern and random words): the weights update on schedule and are
logged, per-domain perplexity is reported, a killed run resumed is bitwise the uninterrupted one,
and mistakes in the domain flags are one line."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from cofi.training.lm_prune import LMPruneConfig, LMPruner
from tiny_llama import WORDS, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny_llama_domains")
    save_tiny_llama(d, hidden=32, heads=4, kv_heads=2, intermediate=64, max_positions=64)
    rng = random.Random(0)
    (d / "pattern.txt").write_text("\n".join(" ".join(WORDS[s:s + 5]) for s in (rng.randrange(25) for _ in range(200))))
    (d / "noise.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=5)) for _ in range(200)))
    return {"model": d, "pattern": d / "pattern.txt", "noise": d / "noise.txt"}


def _cfg(t: dict[str, Path], out: Path, **kw) -> LMPruneConfig:
    base = {"model": str(t["model"]), "output_dir": str(out), "domains": f"pattern={t['pattern']},noise={t['noise']}",
            "dynamic_batch_loading": True, "dbl_update_steps": 3, "seq_len": 16, "batch_size": 4, "max_steps": 10,
            "lagrangian_warmup_steps": 5, "target_sparsity": 0.4, "learning_rate": 3e-3, "ce_weight": 1.0,
            "eval_steps": 5, "eval_batches": 2, "save_steps": 3, "loss_chunk": 32, "eval_fraction": 0.1, "num_threads": 1}
    base.update(kw)
    return LMPruneConfig(**base)


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


class _Kill(Exception):
    pass


def test_two_domains_dynamic_batch_loading_and_resume(tiny_lm, tmp_path):
    res = LMPruner(_cfg(tiny_lm, tmp_path / "a"), log=lambda m: None).run()
    recs = _records(tmp_path / "a")
    updates = [r for r in recs if "domain_weights" in r]
    assert [r["step"] for r in updates] == [4, 7, 10]  # updated before the batches of steps 3, 6, 9
    assert all(sum(r["domain_rows"].values()) == 4 for r in recs)
    dom = res["domains"]
    assert dom["names"] == ["pattern", "noise"] and dom["updates"] == 3
    assert dom["weights"] == updates[-1]["domain_weights"] and sum(dom["weights"].values()) == pytest.approx(1.0)
    ref = dom["reference_loss"]  # the unpruned model's held-out loss per domain (random model: about log 32)
    assert all(2.5 < v < 4.5 for v in ref.values())
    for r in updates:
        assert r["domain_excess"] == pytest.approx({k: max(r["domain_loss"][k] - ref[k], 0.0) for k in ref})
    assert set(dom["eval_ppl_pruned"]) == set(dom["eval_ppl_teacher"]) == {"pattern", "noise"}
    assert set(recs[-1]["eval_ppl_domains"]) == {"pattern", "noise"}
    assert math_close_pooled(res["eval_ppl_teacher"], dom["eval_ppl_teacher"])

    def kill(step: int) -> None:
        if step == 8:
            raise _Kill

    with pytest.raises(_Kill):
        LMPruner(_cfg(tiny_lm, tmp_path / "b"), log=lambda m: None, on_step=kill).run()
    resumed = LMPruner(_cfg(tiny_lm, tmp_path / "b"), resume=True, log=lambda m: None).run()
    assert resumed == res and _records(tmp_path / "b") == recs


def math_close_pooled(pooled: float, per_domain: dict[str, float]) -> bool:
    """Equal token counts per domain here, so the pooled perplexity is the geometric mean."""
    return abs(math.log(pooled) - sum(math.log(v) for v in per_domain.values()) / len(per_domain)) < 1e-9


def test_higher_loss_domain_gains_weight(tiny_lm, tmp_path):
    """With reference losses 0 the excess is the loss itself: random words stay hard to predict
    while the pattern is learnt, so the noise domain's weight rises above its start."""
    res = LMPruner(_cfg(tiny_lm, tmp_path / "c", dbl_reference_loss="pattern=0,noise=0", domain_weights="1,1",
                        max_steps=16, dbl_update_steps=4, dbl_eta=2.0, save_steps=16, eval_steps=16),
                   log=lambda m: None).run()
    loss = [r["domain_loss"] for r in _records(tmp_path / "c") if "domain_loss" in r]
    assert loss[-1]["noise"] > loss[-1]["pattern"]
    assert res["domains"]["weights"]["noise"] > 0.7  # 0.83 here


def _cli(capsys, *args: str) -> tuple[int, str]:
    from cofi.cli import main

    rc = main(["prune-lm", *args])
    return rc, capsys.readouterr().err


def test_domain_flag_mistakes_are_one_line(tiny_lm, tmp_path, capsys):
    common = ["--model", str(tiny_lm["model"]), "--target-sparsity", "0.5"]
    two = f"a={tiny_lm['pattern']},b={tiny_lm['noise']}"
    for extra, match in [
        (["--dynamic-batch-loading"], "--dynamic-batch-loading needs --domains"),
        (["--domains", two, "--train-text", str(tiny_lm["pattern"])], "--domains replaces --train-text"),
        (["--domains", "wiki"], "not a built-in domain"),
        (["--domains", two, "--domain-weights", "1,2,3"], "expected 2 values"),
        (["--domains", f"a={tiny_lm['pattern']}", "--dynamic-batch-loading"], "needs two or more --domains"),
        (["--domains", two, "--dbl-reference-loss", "1,1"], "needs --dynamic-batch-loading"),
        (["--domains", two, "--dynamic-batch-loading", "--dbl-update-steps", "0"], "--dbl-update-steps must be >= 1"),
    ]:
        rc, err = _cli(capsys, *common, "--output-dir", str(tmp_path / "x"), *extra)
        assert rc == 2 and err.count("\n") == 1 and match in err, (extra, err)
    assert not (tmp_path / "x").exists()
