"""The cached teacher (cofi.training.teacher_cache) is the per-step teacher: same logits, same
hidden states at real tokens, same distillation losses (float64), and a pruning run with the
cache logs the same losses as one with a teacher forward per step (float32 rounding only)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from cofi import data as D
from cofi.training import losses as LS
from cofi.training.config import TrainConfig
from cofi.training.teacher_cache import TeacherCache, cache_bytes
from cofi.training.task import forward, load_task_bundle
from cofi.training.modeling import load_model

from test_training import _prune_args, _read_jsonl


@pytest.fixture(scope="module")
def setup(tiny):
    cfg = TrainConfig(task="custom", train_file=str(tiny["train"]), eval_file=str(tiny["dev"]),
                      model=str(tiny["teacher"]), max_seq_length=32)
    task = load_task_bundle(cfg, str(tiny["teacher"]))
    teacher = load_model(str(tiny["teacher"]), qa=False, num_labels=2).double().eval()
    return task, teacher


def _batch(task, idx):
    b = task.train.collate(idx)
    b["example_index"] = np.asarray(idx)
    return b


def test_lookup_equals_teacher_forward(setup):
    task, teacher = setup
    layers = LS.default_teacher_layers(teacher.config.num_hidden_layers)
    cache = TeacherCache.build(teacher, task.train, layers, batch_size=48, device=torch.device("cpu"), forward=forward)
    assert cache.logits.dtype == torch.float64 and set(cache.states) == set(layers)
    assert cache.nbytes == 2 * cache_bytes(task.train.lengths, len(layers), teacher.config.hidden_size, 2)
    rng = np.random.default_rng(0)
    for e in range(2):  # fresh training batches (different padding than the build pass)
        for idx in D.epoch_batches(task.train.lengths, 16, int(rng.integers(1 << 30)), e)[:6]:
            b = _batch(task, idx)
            with torch.no_grad():
                ref = forward(teacher, b, hidden=True)
            got = cache.lookup(b["example_index"], b["attention_mask"])
            torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-10)
            kpm = b["attention_mask"].bool()
            for t in layers:
                torch.testing.assert_close(got.hidden_states[t][kpm], ref.hidden_states[t][kpm], rtol=0, atol=1e-10)
                assert torch.all(got.hidden_states[t][~kpm] == 0)
            # the distillation losses read real tokens only: identical
            st = [torch.randn_like(h) for h in ref.hidden_states]
            proj = LS.identity_projection(teacher.config.hidden_size, dtype=torch.float64)
            a, ma = LS.layer_distill_loss(st, ref.hidden_states, proj, teacher_layers=layers, token_mask=kpm)
            c, mc = LS.layer_distill_loss(st, got.hidden_states, proj, teacher_layers=layers, token_mask=kpm)
            assert ma == mc
            torch.testing.assert_close(a, c, rtol=1e-12, atol=0)


def test_token_mask_loss_is_mse_over_real_tokens():
    torch.manual_seed(0)
    B, S, d = 3, 5, 4
    kpm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    st = [torch.randn(B, S, d, dtype=torch.float64) for _ in range(3)]
    te = [torch.randn(B, S, d, dtype=torch.float64) for _ in range(3)]
    proj = LS.identity_projection(d, dtype=torch.float64)
    loss, match = LS.layer_distill_loss(st, te, proj, teacher_layers=(1, 2), token_mask=kpm)
    want = 0.0
    for t, s in zip((1, 2), match):
        diff = (st[s] - te[t])[kpm]
        want += float(diff.pow(2).mean())
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # garbage at padding changes nothing
    te2 = [t.clone() for t in te]
    for t in te2:
        t[~kpm] = 1e6
    loss2, _ = LS.layer_distill_loss(st, te2, proj, teacher_layers=(1, 2), token_mask=kpm)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)


def test_bad_inputs(setup):
    task, teacher = setup
    cache = TeacherCache.build(teacher, task.train, (1, 2), batch_size=64, device=torch.device("cpu"), forward=forward)
    b = _batch(task, [0, 1, 2])
    am = b["attention_mask"].clone()
    am[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask has"):
        cache.lookup(b["example_index"], am)
    with pytest.raises(ValueError, match="eval mode"):
        TeacherCache.build(teacher.train(), task.train, (1,), 8, torch.device("cpu"), forward)
    teacher.eval()


def test_prune_run_same_with_and_without_cache(tiny, capsys):
    from cofi.cli import main

    runs = {}
    for mode in ("on", "off"):
        out = tiny["root"] / f"cache_{mode}"
        rc = main(_prune_args(tiny, out, target_sparsity=0.5, max_steps=40, lagrangian_warmup_steps=10,
                              skip_compact="true", teacher_cache=mode, logging_steps=5))
        assert rc == 0
        runs[mode] = [r for r in _read_jsonl(out / "metrics.jsonl") if "loss" in r]
    log = capsys.readouterr().out
    assert "[teacher] outputs of 256 training examples cached" in log
    assert "[teacher] one teacher forward per step (teacher_cache=off)" in log
    assert len(runs["on"]) == len(runs["off"]) >= 8
    for a, b in zip(runs["on"], runs["off"]):
        for k in ("pred_loss", "layer_loss", "loss"):
            assert a[k] == pytest.approx(b[k], rel=2e-3, abs=1e-5), (a["step"], k)


def test_config_choices():
    from cofi.training.config import ConfigError

    assert TrainConfig.from_dict({"teacher_cache": False}).teacher_cache == "off"  # YAML's `off`
    with pytest.raises(ConfigError, match="teacher_cache"):
        TrainConfig.from_dict({"teacher_cache": "sometimes", "model": "x"}).validate()
