"""Training precision (``precision: fp32 | bf16 | fp16``) on the tiny BERT and task (CPU).

bf16: a pruning run reaches its target like the same fp32 run (the Lagrangian drives the expected
sparsity to the target; the delivered model is within ``sparsity_epsilon``), the run's weights,
optimizer state and mask parameters stay fp32, and the fold is exact in fp32 (compact model ==
masked model). fp16: a GradScaler scales the loss; its state is in every checkpoint and a
``--resume`` continues with it (bitwise the uninterrupted run). A bad value is one line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from _tiny import base_args

from cofi.training.loop import Callback

# test_training.py's fp32 run to 0.6
PRUNE = dict(learning_rate=1e-3, reg_learning_rate=0.1, batch_size=16, eval_steps=20, logging_steps=10,
             prepruning_steps=16, sparsity_epsilon=0.02, target_sparsity=0.6, max_steps=240,
             lagrangian_warmup_steps=120, compact_max_steps=4, compact_batch_size=16, compact_learning_rate=1e-3)


def _args(tiny, out: Path, **kw) -> list[str]:
    return base_args(tiny["model"], tiny["train"], tiny["dev"], out, teacher=tiny["teacher"], **{**PRUNE, **kw})


def _trainer(argv: list[str], callbacks=(), resume: bool = False):
    from cofi.training.config_cli import add_config_arguments, resolve
    from cofi.training.trainer import Trainer

    p = argparse.ArgumentParser()
    add_config_arguments(p, "prune")
    cfg = resolve(p.parse_args(argv), "prune")
    return Trainer(cfg, "prune", resume=resume, callbacks=list(callbacks), log=lambda m: None)


def _last_pruning_record(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("phase") == "pruning" and "expected_sparsity" in r][-1]


@pytest.fixture(scope="module")
def runs(tiny):
    """The same pruning run in fp32 and in bf16: {precision: (output folder, trainer)}."""
    out = {}
    for prec in ("fp32", "bf16"):
        d = tiny["root"] / f"precision_{prec}"
        tr = _trainer(_args(tiny, d, precision=prec))
        tr.run()
        out[prec] = (d, tr)
    return out


def test_bf16_reaches_the_target_like_fp32(runs):
    got = {}
    for prec, (d, tr) in runs.items():
        last = _last_pruning_record(d)
        best = json.loads((d / "best" / "metrics.json").read_text())
        res = json.loads((d / "results.json").read_text())
        got[prec] = (last["expected_sparsity"], best["real_sparsity"], best["accuracy"], res["compact"]["best_metric"])
        assert abs(last["expected_sparsity"] - PRUNE["target_sparsity"]) <= 0.03, (prec, last)
        assert abs(best["real_sparsity"] - PRUNE["target_sparsity"]) <= PRUNE["sparsity_epsilon"], (prec, best)
    print("\nprecision: expected sparsity at the last step, delivered real sparsity, pruned accuracy, compact accuracy")
    for prec, v in got.items():
        print(f"  {prec}: " + ", ".join(f"{x:.4f}" for x in v))
    assert got["bf16"][2] >= got["fp32"][2] - 0.1 and got["bf16"][3] >= got["fp32"][3] - 0.1, got


def test_bf16_keeps_fp32_weights_optimizer_state_and_masks(runs):
    d, tr = runs["bf16"]
    assert tr.cfg.precision == "bf16"
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # the compact model of stage 2
    assert all(p.dtype == torch.float32 for p in tr.ctx.student.parameters())
    assert all(p.dtype == torch.float32 for p in tr.ctx.maskset.parameters())
    for st in tr.ctx.objective.teacher_cache.states.values():  # the cache's stated dtype
        assert st.dtype == torch.float32
    assert tr.ctx.objective.teacher_cache.logits.dtype == torch.float32
    from cofi.training import checkpoint as C

    ck = C.list_checkpoints(d / "checkpoints")[-1]
    st = torch.load(ck, weights_only=True)
    floats = [v for part in ("opt",) for s in st["optim"][part]["state"].values() for v in s.values()
              if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert "scaler" not in st["optim"]  # bf16 needs no loss scaler


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_fold_is_exact_in_fp32(runs, prec):
    """The compact model folded from the bf16 run equals the masked model in fp32 (no autocast)."""
    from safetensors.torch import load_file

    from cofi.masks import Masks
    from cofi.models import CoFiBertForSequenceClassification
    from cofi.runtime import CompactModel

    d, tr = runs[prec]
    src = d / "best" if (d / "best" / "masks.safetensors").exists() else d / "final"
    masked = CoFiBertForSequenceClassification.from_pretrained(str(src), num_labels=2).eval()
    masks = Masks.from_state_dict(load_file(str(src / "masks.safetensors")))
    compact = CompactModel.from_pretrained(str(d / "compact_folded"))
    batch = tr.ctx.task.eval.collate(list(range(16)))
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        a = masked(**kw, masks=masks).logits
        b = compact(**kw).logits
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _fp16_autocast_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


class _SetScale(Callback):
    """Sets the fp16 loss scale at ``step`` (a non-power-of-two: a resume that lost it would
    round the scaled gradients differently); records the scale at the run's end."""

    def __init__(self, step: int, scale: float) -> None:
        self.step, self.scale, self.trainer, self.final = step, scale, None, None

    def on_step_end(self, stage: str, step: int) -> None:
        if step == self.step:
            self.trainer.stage.optim.scaler.update(self.scale)

    def on_run_end(self, trainer) -> None:
        self.final = trainer.stage.optim.scaler.get_scale()


@pytest.mark.skipif(not _fp16_autocast_on_cpu(), reason="this torch has no fp16 autocast on CPU")
def test_fp16_grad_scaler_is_checkpointed_and_resumed(tiny):
    from safetensors.torch import load_file

    from cofi.training import checkpoint as C

    d = tiny["root"] / "precision_fp16"
    argv = _args(tiny, d, precision="fp16", max_steps=30, prepruning_steps=0, lagrangian_warmup_steps=10,
                 save_steps=10, eval_steps=30, keep_checkpoints=3, skip_compact="true")
    cb = _SetScale(5, 1000.0)
    tr = _trainer(argv, [cb])
    cb.trainer = tr
    assert isinstance(tr.stage.optim.scaler, torch.amp.GradScaler)
    tr.run()
    assert cb.final == 1000.0  # no overflow in this run (an overflow would halve it)
    ck = C.list_checkpoints(d / "checkpoints")
    assert len(ck) == 3  # steps 10, 20, 30
    for p in ck:
        assert torch.load(p, weights_only=True)["optim"]["scaler"]["scale"] == 1000.0
    before = load_file(str(d / "final" / "model.safetensors"))
    for p in (ck[-1], ck[-1].with_name(ck[-1].name + ".sha256")):
        p.unlink(missing_ok=True)
    cb2 = _SetScale(-1, 0.0)
    _trainer(argv, [cb2], resume=True).run()  # from step 20: the scaler's state comes back with it
    assert cb2.final == 1000.0
    after = load_file(str(d / "final" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cofi_eval_precision(runs, tiny, capsys):
    """``cofi eval --precision bf16`` runs the compact folder cast to bf16: same accuracy here."""
    from cofi.cli import main

    d, _ = runs["bf16"]
    acc = {}
    for prec in ("fp32", "bf16"):
        assert main(["eval", str(d / "compact"), "--eval-file", str(tiny["dev"]), "--precision", prec]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["precision"] == prec
        acc[prec] = rep["accuracy"]
    assert abs(acc["bf16"] - acc["fp32"]) <= 2 / 64, acc


def test_bad_precision_is_one_line(tiny, capsys):
    from cofi.cli import main

    rc = main(["prune"] + _args(tiny, tiny["root"] / "precision_bad", precision="fp8"))
    err = capsys.readouterr()
    lines = [ln for ln in (err.err + err.out).splitlines() if ln.strip()]
    assert rc != 0 and lines == ["error: cofi config: precision must be one of fp32, bf16, fp16, got 'fp8'"], lines
