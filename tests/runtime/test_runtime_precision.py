"""The compact runtime in bf16 / fp16: a model cast to the dtype runs the per-op path (the native
fused encoder is fp32 / fp64 on CPU), says so (``last_backend``, ``fused_reasons``), and its
logits are those of the fp32 model within the dtype's rounding; under autocast the fused encoder
steps aside too (it would run in the weights' dtype)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
from masked_forward_ref import random_masks, tiny_hf_model  # noqa: E402

from cofi.pruning import prune  # noqa: E402
from cofi.runtime import CompactModel  # noqa: E402
from cofi.runtime.export import example_inputs  # noqa: E402

LOW = [torch.bfloat16, torch.float16]


def _outs(o) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in (o.logits, o.start_logits, o.end_logits) if t is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module", params=[("bert", "cls"), ("roberta", "qa")], ids=["bert-cls", "roberta-qa"])
def saved(request, tmp_path_factory):
    arch, task = request.param
    model = tiny_hf_model(arch, task, torch.float64, num_labels=3 if task == "cls" else 2)
    c = prune(model, random_masks(model.config, True, 1))
    d = tmp_path_factory.mktemp(f"compact_{arch}")
    c.to(torch.float32).save_pretrained(str(d))
    inputs = example_inputs(c, batch=3, seq=12)
    with torch.no_grad():
        truth = _outs(c.to(torch.float64)(*inputs))  # float64: the rounding-free answer
    return d, inputs, truth


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_model_runs_per_op_and_is_close(saved, dtype):
    d, inputs, truth = saved
    m32 = CompactModel.from_pretrained(str(d))
    m = CompactModel.from_pretrained(str(d), dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    with torch.no_grad():
        o32 = _outs(m32(*inputs))
        assert m32.last_backend == "fused"
        o = m(*inputs)
        assert m.last_backend == "ops"
        why = m.fused_reasons()
        assert any(str(dtype).split(".")[-1] in w for w in why), why
        with pytest.raises(RuntimeError, match="backend 'fused' cannot run"):
            m.set_backend("fused")(*inputs)
        ref = _outs(m.set_backend("torch")(*inputs))  # the same math in plain aten ops, same dtype
        m.set_backend("auto")
    got = _outs(o)
    assert got.dtype == dtype and bool(torch.isfinite(got).all())
    # FlashAttention rule: the error vs float64 is at most 2x that of the plain-aten model in the
    # same dtype (+ a little), and small in absolute terms (bf16: 8 mantissa bits)
    err, ref_err = _rel(got, truth), _rel(ref, truth)
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    assert err <= (3e-2 if dtype == torch.bfloat16 else 5e-3), err
    assert _rel(o32, truth) < 1e-5


def test_autocast_over_fp32_weights_uses_the_per_op_path(saved):
    d, inputs, truth = saved
    m = CompactModel.from_pretrained(str(d))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert any("autocast" in w for w in m.fused_reasons())
        o = _outs(m(*inputs))
    assert m.last_backend == "ops"
    assert bool(torch.isfinite(o).all())
    assert _rel(o, truth) <= 3e-2
    with torch.no_grad():
        m(*inputs)
    assert m.last_backend == "fused"  # autocast off again: back to the fused encoder
