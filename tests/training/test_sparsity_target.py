"""The delivered compact model meets the budget whatever the schedule: a short prune run far from
convergence delivers real sparsity within 0.005 of the target (projected), a target-architecture
run delivers exactly the asked shape; the budget is reported before the run (budget.json);
bad and conflicting targets are one-line errors."""
from __future__ import annotations

import json

import pytest

from test_training import _prune_args

SHORT = dict(max_steps=24, prepruning_steps=4, lagrangian_warmup_steps=8, eval_steps=8, save_steps=24,
             compact_max_steps=4, compact_batch_size=16, compact_learning_rate=1e-3)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_short_run_delivers_the_target(tiny, target):
    from cofi.cli import main
    from cofi.runtime import CompactModel

    out = tiny["root"] / f"short{target}"
    assert main(_prune_args(tiny, out, target_sparsity=target, **SHORT)) == 0
    res = json.loads((out / "results.json").read_text())
    d = res["prune"]["delivered"]
    cm = CompactModel.from_pretrained(str(out / "compact"))
    assert target <= cm.sparsity() <= target + 0.005 if d["masks"] == "projected" else abs(cm.sparsity() - target) <= 0.005
    assert cm.sparsity() == pytest.approx(d["real_sparsity"], abs=1e-12)
    assert d["masks"] in ("converged", "projected") and d["source"] in ("best", "final")
    b = json.loads((out / "budget.json").read_text())
    assert b["budget"] == "target_sparsity" and b["encoder_params_full"] == CompactModel.from_pretrained(
        str(out / "compact")).config.full_encoder_params()
    assert b["latency"]["budget_ms"] > 0 and b["latency"]["speedup"] > 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in evals if r.get("stage") == "prune" and "masks" in r]
    assert after and all(abs(r["real_sparsity"] - target) <= 0.005 for r in after)


def test_target_shape_is_exact(tiny):
    from cofi.cli import main
    from cofi.runtime import CompactModel

    out = tiny["root"] / "shape"
    assert main(_prune_args(tiny, out, target_heads=2, target_ffn=20, target_hidden=24, target_layers=1, **SHORT)) == 0
    cm = CompactModel.from_pretrained(str(out / "compact"))
    c = cm.config
    live = [i for i in range(len(c.num_heads)) if c.attention_present[i] or c.ffn_present[i]]
    assert c.hidden_size == 24 and len(live) == 1
    assert all(c.attention_present[i] and c.ffn_present[i] and c.num_heads[i] == 2 and c.intermediate_sizes[i] == 20
               for i in live)
    res = json.loads((out / "results.json").read_text())
    assert res["prune"]["delivered"]["masks"] == "shape"
    b = json.loads((out / "budget.json").read_text())
    assert b["target_shape"] == {"target_hidden": 24, "target_heads": 2, "target_ffn": 20, "target_layers": 1}
    assert b["encoder_params_kept"] == cm.num_encoder_params()


@pytest.mark.parametrize("extra, msg", [
    (dict(target_sparsity=0.5, target_heads=2), "target_sparsity (0.5) and a target shape (target_heads=2) are two budgets"),
    (dict(target_heads=9), "target_heads must be in [1, 4] (the model's num_attention_heads), got 9"),
    (dict(target_layers=0), "target_layers must be >= 1 or null"),
    (dict(target_ffn=65), "target_ffn must be in [1, 64]"),
])
def test_bad_targets_are_one_line_errors(tiny, capsys, extra, msg):
    from cofi.cli import main

    out = tiny["root"] / "bad_target"
    assert main(_prune_args(tiny, out, **{**SHORT, **extra})) != 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err
