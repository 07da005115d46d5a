"""The Lagrangian controller's rate follows the schedule (cofi.training.optim.controller_lr): a
warm-up too short for log_alpha to travel at reg_learning_rate gets a raised rate, so the
expected sparsity reaches the target by the end of the warm-up; a long enough schedule (the demo
preset's) and a rate the user gives are kept; --resume stays bitwise equal with a raised rate."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from _tiny import base_args
from test_training import _forked, _kill_child, _weights

TRAVEL = math.log(1e4)  # the clamp range [log 1e-2, log 1e2]: from the clamped init mean 10 to the bottom


def _cfg(**kw):
    from cofi.training.config import TrainConfig

    return TrainConfig(model="m", **kw)


def test_rule():
    from cofi.masks import MaskConfig
    from cofi.training.optim import controller_lr

    assert MaskConfig(2, 32, 4, 64).score_travel == pytest.approx(TRAVEL)
    from cofi.data.batching import num_batches
    from cofi.training.config_cli import PRESETS

    # the demo preset (Rotten Tomatoes: 10202 training examples) is fast enough: its rate is kept
    demo = PRESETS["demo"]
    warm = round(demo["lagrangian_warmup_epochs"] * num_batches(10202, demo["batch_size"]))
    lr, rec = controller_lr(_cfg(reg_learning_rate=demo["reg_learning_rate"]), TRAVEL, warm)
    assert warm == 319 and lr == demo["reg_learning_rate"] and not rec["adapted"]
    # cpu-small on a 2k-example CSV: reg lr 0.05 over a 94-step warm-up is raised to 3 * travel / 94
    lr, rec = controller_lr(_cfg(reg_learning_rate=0.05), TRAVEL, 94)
    assert lr == pytest.approx(3 * TRAVEL / 94) and rec["adapted"] and rec["configured"] == 0.05
    lr, rec = controller_lr(_cfg(reg_learning_rate=0.05, reg_learning_rate_adapt=False), TRAVEL, 94)
    assert lr == 0.05 and not rec["adapted"]


def _resolve(argv: list[str]):
    from cofi.training.config_cli import add_config_arguments, resolve

    p = argparse.ArgumentParser()
    add_config_arguments(p, "prune")
    return resolve(p.parse_args(["--model", "m", "--teacher", "t"] + argv), "prune")


def test_a_given_rate_is_kept(tmp_path):
    assert _resolve(["--preset", "cpu-small"]).reg_learning_rate_adapt  # a preset's rate may be raised
    assert not _resolve(["--preset", "cpu-small", "--reg-learning-rate", "0.05"]).reg_learning_rate_adapt
    assert not _resolve(["--set", "reg_learning_rate=0.05"]).reg_learning_rate_adapt
    y = tmp_path / "c.yaml"
    y.write_text("reg_learning_rate: 0.05\n")
    assert not _resolve(["--config", str(y)]).reg_learning_rate_adapt
    y.write_text("reg_learning_rate: 0.05\nreg_learning_rate_adapt: true\n")  # a saved run's config.yaml
    assert _resolve(["--config", str(y)]).reg_learning_rate_adapt


PRE, WARM = 8, 120


def _args(tiny, out, **kw):
    opts = dict(learning_rate=1e-3, batch_size=16, eval_steps=1000, logging_steps=1, save_steps=1000,
                prepruning_steps=PRE, lagrangian_warmup_steps=WARM, max_steps=PRE + WARM, target_sparsity=0.6,
                skip_compact="true")
    opts.update(kw)
    return ["prune"] + base_args(tiny["model"], tiny["train"], tiny["dev"], out, teacher=tiny["teacher"], **opts)


def _end_of_warmup(out) -> float:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["expected_sparsity"] for r in recs if r.get("phase") == "pruning" and r["step"] == PRE + WARM)


def test_short_warmup_reaches_the_target(tiny, capsys):
    from cofi.cli import main

    out = tiny["root"] / "ctl_adapted"
    assert main(_args(tiny, out)) == 0
    assert "controller: reg_learning_rate 0.01 -> 0.2303" in capsys.readouterr().out
    c = json.loads((out / "results.json").read_text())["prune"]["controller"]
    assert c["adapted"] and c["configured"] == 0.01 and c["effective"] == pytest.approx(3 * TRAVEL / WARM)
    assert abs(_end_of_warmup(out) - 0.6) <= 0.03
    # the same schedule at the rate given (0.01 moves a score ~1.2 in 120 steps): far behind
    slow = tiny["root"] / "ctl_given"
    assert main(_args(tiny, slow, reg_learning_rate=0.01)) == 0
    assert not json.loads((slow / "results.json").read_text())["prune"]["controller"]["adapted"]
    assert _end_of_warmup(slow) < 0.3


def test_resume_with_a_raised_rate_is_bitwise_equal(tiny):
    from cofi.cli import main

    kw = dict(max_steps=30, lagrangian_warmup_steps=20, prepruning_steps=4, save_steps=10, eval_steps=10)
    ref = tiny["root"] / "ctl_ref"
    assert main(_args(tiny, ref, **kw)) == 0
    assert json.loads((ref / "results.json").read_text())["prune"]["controller"]["adapted"]
    out = tiny["root"] / "ctl_killed"
    assert _forked(_kill_child, _args(tiny, out, **kw), "prune:17") == -9
    assert main(_args(tiny, out, **kw) + ["--resume"]) == 0
    for sub in ("final", "best"):
        a, b = _weights(ref / sub), _weights(out / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "final" / "mask_params.safetensors")), load_file(str(out / "final" / "mask_params.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
