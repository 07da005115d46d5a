"""Trainer step time of two checkouts side by side: the pruning step ``cofi.training`` really takes
(``Trainer.train_step``; in a tree before it existed, the stage's step closure taken from the
loop), at the initial masks and at expected sparsity 0.9, alternating one process per tree per
round so that drift of the machine's speed hits both alike. Reports new/old per round (median,
min, max).

Run: python benchmarks/compare_train_step.py --old /path/to/old/checkout [--new .] [--rounds 5]
(an old checkout needs its built extension: copy python/cofi/_C*.so into it; ``--quick``: one round
of one step per tree, nothing written). Writes benchmarks/results/cpu/refactor_train_step.json
(``_harness.env_tags`` plus both trees' git shas). ``--child ROOT`` is one measurement (internal).
Steps are timed one after another in the child (mask restore between them untimed), not by
``_harness.measure`` / ``time_interleaved``: the two trees cannot share a process.

The helpers here (model folder, data, config, sparsity) use only what both trees have; the
full benchmark (bench_train_step.py) builds its trainers with them.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import _harness as H

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
SHAPES = {
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512),
    "minilm-l6": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
LOGA_ON, LOGA_OFF = math.log(100.0), math.log(0.01)
WORDS = [f"w{i}" for i in range(995)]


def make_inputs(d: Path, shape: str, batch: int, seq: int, seed: int = 0) -> tuple[Path, Path]:
    """A random BERT of ``shape`` (model folder with a word-level tokenizer) and a csv of ``batch``
    examples of exactly ``seq`` tokens."""
    import random

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    model = d / "model"
    model.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(str(model))
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), num_labels=2, **SHAPES[shape])).save_pretrained(str(model))
    rng = random.Random(seed)
    data = d / "train.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, ["sentence", "label"])
        w.writeheader()
        for _ in range(batch):
            w.writerow({"sentence": " ".join(rng.choice(WORDS) for _ in range(seq - 2)), "label": rng.randrange(2)})
    return model, data


def config(model: Path, data: Path, out: Path, batch: int, seq: int, *, backend: str = "compact",
           teacher_cache: str = "off", target: float = 0.0, threads: int = 2):
    """A pruning run that starts pruning at step 0 (no pre-pruning) and never logs, evaluates or saves."""
    from cofi.training.config import TrainConfig

    big = 10 ** 9
    return TrainConfig(task="custom", train_file=str(data), eval_file=str(data), model=str(model), teacher=str(model),
                       output_dir=str(out), max_seq_length=seq, batch_size=batch, eval_batch_size=batch,
                       prepruning_steps=0, lagrangian_warmup_steps=0, max_steps=big, logging_steps=big, eval_steps=big,
                       save_steps=big, progress=False, num_threads=threads, freeze_embeddings=True, backend=backend,
                       teacher_cache=teacher_cache, target_sparsity=target, skip_compact=True)


def set_sparsity(ms, s: float, seed: int = 0) -> float:
    """log_alphas with expected sparsity ~s: 0 = a fresh MaskSet (reference init, clamped as after
    the first step); s > 0 = clamp bounds, a random fraction f of head / FFN units and f^(1/4) of
    hidden dims "on" (+4.6), the rest "off" (-4.6), layer gates on, f found by bisection."""
    import torch

    ms.reset_parameters(torch.Generator().manual_seed(seed))
    ms.clamp_()
    if s <= 0:
        return float(ms.expected_sparsity()[1])
    g = torch.Generator().manual_seed(seed)
    # group names spelled out, not cofi.vocab's: the helpers also run in checkouts that predate it
    ranks = {n: torch.rand(ms.cfg.shape(n), generator=g) for n in ("hidden", "head", "intermediate")}

    def apply(f: float) -> float:
        with torch.no_grad():
            ms.log_alpha.fill_(LOGA_ON)
            for n, r in ranks.items():
                frac = f ** 0.25 if n == "hidden" else f
                ms.group_view(ms.log_alpha, n).copy_(torch.where(r < frac, LOGA_ON, LOGA_OFF))
        return float(ms.expected_sparsity()[1])

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if apply(mid) > s:
            lo = mid
        else:
            hi = mid
    return apply((lo + hi) / 2)


def pruning_step(cfg):
    """(step(batch), maskset, task, release) of a pruning Trainer for ``cfg``: ``Trainer.train_step``,
    or in a tree without it the pruning stage's step closure, caught where the loop receives it."""
    from cofi.training import trainer as T

    if hasattr(T.Trainer, "train_step"):
        tr = T.Trainer(cfg, "prune")
        return (lambda batch: tr.train_step(batch, 0)), tr.ctx.maskset, tr.ctx.task, tr.release

    class Caught(Exception):
        pass

    got = {}

    def loop(self, stage, model, **kw):
        got.update(kw)
        raise Caught

    T.Trainer.loop = loop
    tr = T.Trainer(cfg, "prune")
    try:
        tr.run()
    except Caught:
        pass
    ls = T.LoopState()
    return (lambda batch: got["step_fn"](batch, ls)), tr.maskset, tr.task, tr.release


def time_step(step, ms, batch, sparsity: float, warmup: int, reps: int) -> dict:
    """Median seconds of ``step(batch)`` with the masks held at ``sparsity`` (log_alpha restored after each)."""
    import torch

    es = set_sparsity(ms, sparsity)
    la0 = ms.log_alpha.detach().clone()
    ts = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        step(batch)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            ms.log_alpha.copy_(la0)
        if i >= warmup:
            ts.append(dt)
    return {"sparsity": sparsity, "expected_sparsity": es, "median_s": statistics.median(ts), "all_s": ts}


def child(a) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as t:
        model, data = make_inputs(Path(t), a.shape, a.batch, a.seq)
        step, ms, task, release = pruning_step(config(model, data, Path(t) / "run", a.batch, a.seq,
                                                      threads=a.threads))
        try:
            idx = np.arange(a.batch)
            batch = {k: v for k, v in task.train.collate(idx).items()}
            batch["example_index"] = idx
            rows = [time_step(step, ms, batch, s, a.warmup, a.reps) for s in a.sparsities]
        finally:
            release()
    print("RESULT " + json.dumps(rows), flush=True)


def measure(root: Path, a) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "python"), str(root)]), OMP_NUM_THREADS=str(a.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(root), "--shape", a.shape, "--batch", str(a.batch),
           "--seq", str(a.seq), "--reps", str(a.reps), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--sparsities", *map(str, a.sparsities)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(root))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"measurement in {root} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def git_sha(root: Path) -> str:
    try:
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main() -> None:
    ap = H.base_parser(__doc__.split("\n")[0], cpu_only=True)
    ap.add_argument("--old", help="checkout of the baseline tree")
    ap.add_argument("--new", default=str(ROOT), help="checkout of the tree to compare (default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default="minilm-l6", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sparsities", nargs="*", type=float, default=[0.0, 0.9])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.set_defaults(out=str(ROOT / "benchmarks/results/cpu/refactor_train_step.json"))
    a = ap.parse_args()
    if a.child:
        return child(a)
    if a.quick:
        a.rounds, a.reps, a.warmup = 1, 1, 1
    if not a.old:
        ap.error("--old is required")
    old, new = Path(a.old).resolve(), Path(a.new).resolve()
    rounds = []
    for r in range(a.rounds):
        if r % 2 == 0:  # alternate which tree runs first
            o = measure(old, a)
            n = measure(new, a)
        else:
            n = measure(new, a)
            o = measure(old, a)
        pair = {"old": o, "new": n}
        rounds.append(pair)
        print(f"round {r + 1}: " + ", ".join(
            f"s={o['sparsity']:g} old {o['median_s'] * 1e3:.1f} ms new {n['median_s'] * 1e3:.1f} ms "
            f"({n['median_s'] / o['median_s']:.3f})" for o, n in zip(pair["old"], pair["new"])), flush=True)
    summary = []
    for i, s in enumerate(a.sparsities):
        ratios = [p["new"][i]["median_s"] / p["old"][i]["median_s"] for p in rounds]
        summary.append({"sparsity": s, "expected_sparsity": rounds[0]["new"][i]["expected_sparsity"],
                        "old_median_s": statistics.median(p["old"][i]["median_s"] for p in rounds),
                        "new_median_s": statistics.median(p["new"][i]["median_s"] for p in rounds),
                        "ratio_new_over_old": {"median": statistics.median(ratios), "min": min(ratios),
                                               "max": max(ratios), "rounds": ratios}})
        print(f"s={s:g}: new/old {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}, "
              f"{len(ratios)} rounds)")
    import torch

    meta = {**H.env_tags("cpu"), "git_sha": git_sha(new), "git_sha_old": git_sha(old),
            "old": str(old), "new": str(new), "shape": a.shape, "batch": a.batch, "seq": a.seq, "reps": a.reps,
            "warmup": a.warmup, "threads": a.threads, "rounds": a.rounds, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "device": "cpu",
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "command": "python benchmarks/compare_train_step.py " + " ".join(sys.argv[1:])}
    if a.quick:
        return
    print("wrote", H.write_result("refactor_train_step", {"meta": meta, "summary": summary, "rounds": rounds},
                                  "cpu", a.out, indent=1))


if __name__ == "__main__":
    main()
