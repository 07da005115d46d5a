"""A real ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU) pruning run vs one process with
the same global batch: same masks, logged losses and compact model; every rank ends identical.

What must be equal, and how closely:
- rank 0 and rank 1: bitwise (the final weights): they apply the same averaged gradient.
- torchrun vs one process: the kept units of every mask exactly, and the compact model's shape;
  mask values, logged losses, weights and the compact model's logits up to float32 summation order
  (a global batch's mean is the share-weighted mean of two half-batch means, all-reduced), which
  moves them by ~1e-7 relative here (RTOL: 1e-4).
The training set has 113 examples in batches of 16: each epoch ends with a 1-example batch, fewer
examples than ranks (every rank runs it whole); the compact stage's batches of 12 end with 5
examples, split 2 / 3 (shares 0.8 / 1.2).

Run as a script (``torchrun ... test_torchrun.py prune ARGS``), this file is the entry every rank
runs: ``cofi prune ARGS`` with each rank's final weights dumped (``_hooks.DumpRanks``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from _hooks import DumpRanks, run
from _tiny import base_args, make_task

REPO = Path(__file__).resolve().parents[2]
RUN = dict(learning_rate=1e-3, reg_learning_rate=0.1, batch_size=16, eval_steps=8, logging_steps=1,
           prepruning_steps=4, lagrangian_warmup_steps=8, max_steps=16, target_sparsity=0.5, sparsity_epsilon=0.02,
           compact_max_steps=10, compact_batch_size=12, compact_learning_rate=1e-3,
           max_grad_norm=0.0, adam_eps=0.1)  # large eps: no sign-amplified noise from near-zero gradients
RTOL = 1e-4


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _records(out: Path) -> dict[tuple, dict]:
    """metrics.jsonl training records by (stage, step), without the wall-clock rate."""
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["step"]): {k: v for k, v in r.items() if k != "steps_per_s"}
            for r in recs if "loss" in r}


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.double(), b.double()
    assert (a - b).norm() <= RTOL * max(float(b.norm()), 1e-3), (what, float((a - b).norm()), float(b.norm()))


def test_torchrun_two_processes_match_one(tiny):
    from cofi.runtime import CompactModel

    train, dev = make_task(tiny["root"] / "torchrun_data", n_train=113, n_eval=32, fixed_len=8)
    args = lambda out: ["prune"] + base_args(tiny["model"], train, dev, out, teacher=tiny["teacher"], **RUN)
    one, two = tiny["root"] / "torchrun_one", tiny["root"] / "torchrun_two"
    for d in (one, two):
        shutil.rmtree(d, ignore_errors=True)
    assert run(args(one), [DumpRanks()]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", str(Path(__file__).resolve())] + args(two)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-4000:]

    # every rank ends identical
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k

    # the masks: same kept units, values up to summation order
    for name in ("masks.safetensors", "mask_params.safetensors"):
        a, b = _safetensors(two / "final" / name), _safetensors(one / "final" / name)
        assert a.keys() == b.keys()
        for k in a:
            if name == "masks.safetensors":
                assert torch.equal(a[k] != 0, b[k] != 0), k
            _close(a[k], b[k], f"{name}:{k}")

    # the logged losses of every step of both stages (the global batch's, not rank 0's half)
    ra, rb = _records(two), _records(one)
    assert ra.keys() == rb.keys() and {s for s, _ in ra} == {"prune", "compact"}
    for key, rec in ra.items():
        assert rec.keys() == rb[key].keys(), key
        for k, v in rec.items():
            if isinstance(v, float):
                assert abs(v - rb[key][k]) <= RTOL * max(abs(rb[key][k]), 1e-3), (key, k, v, rb[key][k])
            else:
                assert v == rb[key][k], (key, k)

    # the compact model: same shape, weights and logits up to summation order
    ca, cb = (CompactModel.from_pretrained(str(d / "compact")) for d in (two, one))
    assert ca.config.to_dict() == cb.config.to_dict()
    wa, wb = _safetensors(two / "compact" / "model.safetensors"), _safetensors(one / "compact" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        _close(wa[k], wb[k], f"compact:{k}")
    ids = torch.randint(5, ca.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(ca(ids, torch.ones_like(ids)).logits, cb(ids, torch.ones_like(ids)).logits, "compact logits")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], [DumpRanks()]))
