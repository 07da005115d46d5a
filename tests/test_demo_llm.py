"""``cofi demo --preset llm`` end to end on a tiny random Llama (GQA, tied head) and tiny text: the
whole pipeline shape (prune to a uniform shape that drops a layer, fold, recovery, three perplexities,
speed, stock export, report, plots), the run folder is never overwritten, and flags are mapped or
refused in one line."""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
from cofi.errors import UserError
from cofi.pipeline_llm import LMDemoConfig, config_from_args, run_demo
from tiny_llama import WORDS, save_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_llama(d, hidden=64, heads=8, kv_heads=2, intermediate=128, max_positions=64)
    rng = random.Random(0)
    texts = []
    for name, n in (("train.txt", 200), ("heldout.txt", 40)):
        lines = []
        for _ in range(n):
            s = rng.randrange(25)
            lines.append(" ".join(WORDS[s:s + 5]))
        (d / name).write_text("\n".join(lines))
        texts.append(d / name)
    return d, texts[0], texts[1]


def _cfg(tiny, out: Path) -> LMDemoConfig:
    model, train, heldout = tiny
    return LMDemoConfig(model=str(model), output_dir=str(out), train_text=str(train), eval_text=str(heldout),
                        seq_len=32, batch_size=4, prune_steps=4, lagrangian_warmup_steps=2, recover_steps=2,
                        target_layers=1, target_hidden=64, target_heads=4, target_kv_heads=2, target_intermediate=64,
                        learning_rate=3e-3, recover_learning_rate=3e-3, precision="fp32", eval_steps=2,
                        eval_batches=1, save_steps=4, eval_window=32, eval_windows=3, speed_prompt=8,
                        speed_new_tokens=4, speed_reps=1, num_threads=1)


def test_demo_llm_pipeline(tiny, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "demo-llm"
    lines: list[str] = []
    assert run_demo(_cfg(tiny, out), log=lines.append) == 0
    r = json.loads((out / "report.json").read_text())
    assert set(r["perplexity"]) >= {"dense", "pruned", "recovered"}
    assert all(r["perplexity"][k]["windows"] == 3 for k in ("dense", "pruned", "recovered"))
    assert r["structure"]["attention"] == [True, False] or r["structure"]["attention"] == [False, True]
    assert r["params"]["pruned"]["body"] < r["params"]["dense"]["body"]
    assert r["params"]["pruned"]["embedding"] == r["params"]["dense"]["embedding"] == 32 * 64
    assert r["params"]["pruned"]["lm_head"] == 0  # tied, stated apart
    assert r["stock_export"]["max_abs_logit_gap_vs_compact"] < 1e-4
    stock = AutoConfig.from_pretrained(out / "export")
    assert (stock.num_hidden_layers, stock.num_attention_heads, stock.num_key_value_heads, stock.intermediate_size) \
        == (1, 4, 2, 64)
    assert {"prefill_ms", "decode_tokens_per_s", "decode_speedup"} <= set(r["speed"]["pruned"])
    rec = [json.loads(ln) for ln in (out / "recover_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rec] == [5, 6] and "eval_ppl" in rec[-1]
    for name in ("ppl_steps.png", "sparsity_lambdas.png", "structure.png"):
        assert (out / name).stat().st_size > 0
    assert any("held-out perplexity" in ln for ln in lines)
    with pytest.raises(UserError, match="not empty"):  # never overwrites a run
        run_demo(_cfg(tiny, out), log=lines.append)
    assert run_demo(_cfg(tiny, out), resume=True, log=lines.append) == 0  # every stage done: report again


def test_demo_flags_mapped_or_refused():
    ns = argparse.Namespace(preset="llm", resume=False, command="demo", max_steps=7, compact_max_steps=3,
                            target_heads=3, task=None, seed=0)
    cfg = config_from_args(ns)
    assert (cfg.prune_steps, cfg.recover_steps, cfg.target_heads, cfg.target_kv_heads, cfg.seed) == (7, 3, 3, 1, 0)
    with pytest.raises(UserError, match="--task"):
        config_from_args(argparse.Namespace(preset="llm", task="sst2"))
