"""The training step and its pieces: the fused mask step feeds the Lagrangian (one mask op each
way, the same numbers as the unfused ops), ``Trainer.train_step`` is the loop's step, the
structure summary comes from ``cofi.masks.sparsity``, and an evaluation whose outputs are NaN is
recorded as ``nonfinite`` and never picked as best."""
from __future__ import annotations

import json

import pytest
import torch

from _hooks import NanAt
from _tiny import base_args
from test_training import _read_jsonl


def _maskset(groups=None, target=None):
    from transformers import BertConfig

    from cofi.masks import MaskConfig, MaskSet

    hf = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    mc = MaskConfig.from_hf_config(hf, **({} if groups is None else {"groups": groups}))
    torch.manual_seed(0)
    ms = MaskSet(mc, target=target)
    with torch.no_grad():
        ms.lambda_1.fill_(0.3)
        ms.lambda_2.fill_(-0.2)
    return ms


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("groups", [None, ("hidden", "head", "intermediate")])
def test_lagrangian_from_the_fused_step_is_the_unfused_one(backend, groups):
    from cofi import ops

    ms = _maskset(groups)
    w = torch.randn(ms.num_masks, generator=torch.Generator().manual_seed(1))
    got = []
    with ops.use_backend(backend):
        for fused in (False, True):
            ms.zero_grad()
            ops.reset_stats()
            st = ms.step(generator=torch.Generator().manual_seed(3))
            loss, s = ms.lagrangian(0.4, step=st if fused else None)
            (loss + sum((z.reshape(-1) * w[:z.numel()]).sum() for _, z in st.z.items())).backward()
            calls = sorted({op for (op, *_), n in ops.backend_stats().items()})
            got.append((loss.detach(), s.detach(), ms.log_alpha.grad.clone(), ms.lambda_1.grad.clone(), calls))
    (l0, s0, g0, lam0, calls0), (l1, s1, g1, lam1, calls1) = got
    assert torch.equal(l0, l1) and torch.equal(s0, s1) and torch.equal(g0, g1) and torch.equal(lam0, lam1)
    assert calls1 == ["hard_concrete_step"]  # fwd and bwd of one op
    assert "hard_concrete_keep_prob" in calls0 and "expected_size" in calls0


def test_structure_summary_counts_live_units():
    from cofi.masks import Masks
    from cofi.masks.sparsity import structure_summary

    ms = _maskset()
    m = Masks(hidden=torch.tensor([1.0] * 40 + [0.0] * 24), head=torch.tensor([[1.0, 0, 1, 1]] * 3),
              mha=torch.tensor([1.0, 0.0, 0.5]), intermediate=torch.cat([torch.ones(3, 100), torch.zeros(3, 28)], 1),
              ffn=torch.tensor([0.0, 1.0, 1.0]))
    assert structure_summary(m, ms.cfg) == {"hidden": 40, "heads": [3, 0, 3], "ffn": [0, 100, 100]}
    only = Masks(head=m.head)
    assert structure_summary(only, _maskset(("head",)).cfg) == {"heads": [3, 3, 3]}


def _config(tiny, out, command, **kw):
    import argparse

    from cofi.training.config_cli import add_config_arguments, resolve

    p = argparse.ArgumentParser()
    add_config_arguments(p, command)
    extra = {"teacher": tiny["teacher"]} if command == "prune" else {}
    return resolve(p.parse_args(base_args(tiny["model"], tiny["train"], tiny["dev"], out, **extra, **kw)), command)


def test_train_step_is_the_loops_step(tiny, tmp_path):
    """Two trainers of one config: run() for 3 steps == train_step on the loop's 3 batches."""
    from cofi import data as D
    from cofi.training.trainer import Trainer

    kw = dict(target_sparsity=0.5, max_steps=3, prepruning_steps=1, lagrangian_warmup_steps=2, batch_size=16,
              eval_steps=100, save_steps=100, skip_compact="true", dropout=0.0)
    ran = Trainer(_config(tiny, tmp_path / "a", "prune", **kw), "prune")
    ran.run()
    t = Trainer(_config(tiny, tmp_path / "b", "prune", **kw), "prune")
    try:
        task, cfg = t.ctx.task, t.cfg
        t.model.train()
        for step, idx in enumerate(D.epoch_batches(task.train.lengths, cfg.batch_size, cfg.seed, 0)[:3]):
            t.stage.set_phase(step)
            batch = {k: v for k, v in task.train.collate(idx).items()}
            batch["example_index"] = idx
            rec = t.train_step(batch, step)
            assert rec["phase"] == ("pre" if step == 0 else "pruning") and torch.isfinite(rec["loss"])
    finally:
        t.release()
    a, b = ran.model.state_dict(), t.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ran.ctx.maskset.log_alpha, t.ctx.maskset.log_alpha)


def test_nonfinite_evaluation_is_recorded_and_never_best(tiny, tmp_path, capsys):
    from cofi.training.trainer import Trainer

    out = tmp_path / "nan"
    nan = NanAt("finetune", 6)
    t = Trainer(_config(tiny, out, "finetune", max_steps=8, eval_steps=4, batch_size=16, learning_rate=1e-3), "finetune",
                callbacks=[nan])
    nan.model = t.model
    res = t.run()
    evals = [r for r in _read_jsonl(out / "metrics.jsonl") if "eval" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert "nonfinite" not in evals[0]["eval"] and evals[1]["eval"] == {"nonfinite": True}
    assert res["best_metric"] == evals[0]["eval"]["accuracy"] and res["last_eval"] == {"nonfinite": True}
    assert json.loads((out / "results.json").read_text())["best_step"] == 4
    assert "step 8: model outputs are NaN/inf (nonfinite" in capsys.readouterr().out
