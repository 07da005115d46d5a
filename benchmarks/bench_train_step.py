"""One full CoFi pruning step, compacted vs dense-masked vs a plain dense fine-tuning step.

The CoFi step is the trainer's own: ``Trainer.train_step`` of a ``cofi prune`` trainer in the
pruning phase (cofi.training.prune: one fused mask step, student forward + backward with the masks
(``backend="compact"`` or ``backend="dense"``, the reference's method), teacher forward or cache
lookup, prediction KL + layer distillation, Lagrangian, gradient clipping, three AdamW optimisers
(model: fused, embeddings frozen; log_alpha; lambdas by gradient ascent), log_alpha clamp), with
the trainer's default loss weights. The trainer is built from a random model folder of the shape
and a csv of ``--batch`` examples of exactly ``--seq`` tokens (compare_train_step.make_inputs); it
is its own teacher. The plain step: transformers' BertForSequenceClassification (SDPA) forward +
cross-entropy + backward + clip + fused AdamW over all parameters, same weights and batch.

Sparsity levels: 0 = a fresh MaskSet (reference init, clamped as after the first step); s > 0 =
log_alphas set to the clamp bounds, a random fraction f of head / FFN units and f^(1/4) of hidden
dims "on" (+4.6), the rest "off" (-4.6; still sampled nonzero with p = 0.047), layer gates on, f
found by bisection so the expected sparsity equals s; log_alpha is restored after every step.
Masks are sampled fresh every step. The Lagrangian's target is the largest sparsity timed.

Teacher: a forward pass per step (the reference), or the trainer's teacher cache (one pass per
example per run; its cost amortised over `--amortize-epochs` in the table).

Run: PYTHONPATH=python:. python benchmarks/bench_train_step.py [--quick] (MiniLM shape, batch 8 x 64,
sparsity 0 and 0.9, 1 rep). Each provider is timed alone, call after call (the mask restore between
calls untimed; one trainer alive at a time), so not by ``_harness.measure`` / ``time_interleaved``.
Writes benchmarks/results/cpu/train_step.json (with ``_harness.env_tags``; a markdown table next to it).

``--precisions fp32,bf16``: instead, the same compact pruning step at each precision (the trainer's
``precision``: autocast forwards, fp32 master weights / masks / Lagrangian / losses), one trainer per
precision alive together, timed interleaved (one step of each per round, ``time_interleaved``; the
log_alpha restore is inside the timed call, a few-KB copy); the ratio is each precision's median
step over fp32's, both from the same rounds. Writes benchmarks/results/cpu/train_step_precision.json.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
sys.path += [str(ROOT / "python"), str(ROOT), str(ROOT / "benchmarks")]  # PYTHONPATH (if set) wins

import _harness as H  # noqa: E402
import cofi  # noqa: E402
from cofi import ops as cops  # noqa: E402
from cofi.bench.harness import time_interleaved  # noqa: E402
from cofi.training.trainer import Trainer  # noqa: E402
from compare_train_step import SHAPES, config, make_inputs, set_sparsity  # noqa: E402


def timeit(fn, warmup: int, reps: int, after=None) -> dict:
    """Seconds per ``fn()`` call; ``after()`` runs untimed after each call."""
    ts = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if after is not None:
            after()
        if i >= warmup:
            ts.append(dt)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return {"median_s": statistics.median(ts), "p10_s": q(0.1), "p90_s": q(0.9), "reps": reps, "all_s": ts}


def plain_step_fn(model_dir: Path, batch: dict):
    from transformers import BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-5, fused=True)

    def step():
        out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"])
        loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def trainer_for(model_dir: Path, data: Path, out: Path, batch: int, seq: int, variant: str, target: float,
                precision: str = "fp32") -> Trainer:
    """A pruning trainer in the pruning phase from step 0; ``variant``: compact|dense[_cached]."""
    import dataclasses

    backend, cached = variant.split("_")[0], variant.endswith("_cached")
    cfg = config(model_dir, data, out, batch, seq, backend=backend, teacher_cache="on" if cached else "off",
                 target=target, threads=torch.get_num_threads())
    cfg = dataclasses.replace(cfg, precision=precision)
    tr = Trainer(cfg, "prune", log=lambda m: None)
    tr.model.train()
    return tr


def example_batch(tr: Trainer, n: int) -> dict:
    idx = np.arange(n)
    batch = dict(tr.ctx.task.train.collate(idx))
    batch["example_index"] = idx
    return batch


def _uncommitted(paths: list[str]) -> list[str] | None:
    """Source files that differ from the commit in git_sha (the measured code is not exactly it)."""
    import subprocess

    try:
        r = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(line[3:] for line in r.stdout.splitlines()) if r.returncode == 0 else None


def precision_main(a, shapes: list[str], sps: list[float], batch: int, seq: int, reps: int) -> None:
    """``--precisions``: the compact step at each precision, interleaved, ratios vs the first (fp32)."""
    precs = [p.strip() for p in a.precisions.split(",") if p.strip()]
    if precs[:1] != ["fp32"] or len(precs) < 2 or len(set(precs)) != len(precs):
        raise SystemExit(f"--precisions must start with fp32 and name others to compare, got {a.precisions!r}")
    variant = a.variants.split(",")[0].strip()
    rows, target = [], max([x for x in sps if x < 1.0] + [0.0])
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, data = make_inputs(Path(tmp), shape, batch, seq)
            trs = {p: trainer_for(model_dir, data, Path(tmp) / f"run_{p}", batch, seq, variant, target, p)
                   for p in precs}
            bt = example_batch(trs["fp32"], batch)
            for sp in sps:
                fns = {}
                for p, tr in trs.items():
                    ms = tr.ctx.maskset
                    es = set_sparsity(ms, sp)
                    la0 = ms.log_alpha.detach().clone()

                    def step(tr=tr, ms=ms, la0=la0):
                        tr.train_step(bt, 0)
                        with torch.no_grad():  # keep the sparsity level fixed across repetitions
                            ms.log_alpha.copy_(la0)
                    fns[p] = step
                cops.reset_stats()
                t = time_interleaved(fns, rounds=reps, warmup=a.warmup)
                ran = sorted({f"{op}:{be}" for (op, be, *_), _ in cops.backend_stats().items()})
                base = t["fp32"]["p50_ms"]
                for p in precs:
                    r = {k: v / 1e3 for k, v in t[p].items() if k.endswith("_ms")}
                    rows.append({"shape": shape, "variant": variant, "sparsity": sp, "expected_sparsity": es,
                                 "precision": p, "median_s": r["p50_ms"], "p10_s": r["p10_ms"], "p90_s": r["p90_ms"],
                                 "rounds": t[p]["n"], "ratio_vs_fp32": t[p]["p50_ms"] / base})
                    print(f"{shape} s={sp:.2f} {variant} {p}: {t[p]['p50_ms']:.1f} ms  "
                          f"{t[p]['p50_ms'] / base:.3f}x fp32", flush=True)
                rows[-1]["backends_all_precisions"] = ran
            for tr in trs.values():
                tr.release()
    meta = {**H.env_tags("cpu"), "torch": torch.__version__, "cofi": cofi.__version__,
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "batch": batch, "seq": seq, "quick": a.quick, "rounds": reps, "warmup": a.warmup, "precisions": precs,
            "step": "Trainer.train_step", "timestamp": datetime.now(timezone.utc).isoformat(), "device": "cpu",
            "uncommitted_sources": _uncommitted(["python/cofi", "csrc", "cofi_kernels"]),
            "cofi_backend": os.environ.get("COFI_BACKEND") or "auto",
            "ops_ran": sorted({b for r in rows for b in r.get("backends_all_precisions", [])})}
    out = a.out if a.out_given else str(ROOT / "benchmarks/results/cpu/train_step_precision.json")
    path = H.write_result("train_step_precision", {"meta": meta, "rows": rows}, "cpu", out, indent=1)
    print(f"wrote {path}")


def main() -> None:
    ap = H.base_parser(__doc__.split("\n")[0], cpu_only=True)
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--sparsities", nargs="*", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default="compact,compact_cached,dense",
                    help="comma-separated from compact, compact_cached, dense, dense_cached (_cached: the "
                         "trainer's teacher cache instead of a teacher forward per step)")
    ap.add_argument("--amortize-epochs", type=float, default=20.0,
                    help="epochs over which the teacher cache's one pass is amortised (paper: 20 pruning epochs)")
    ap.add_argument("--precisions", default=None,
                    help="e.g. fp32,bf16: time the compact step at each precision side by side instead "
                         "(results/cpu/train_step_precision.json)")
    a = ap.parse_args()
    a.out_given = a.out is not None
    if a.out is None:
        a.out = str(ROOT / "benchmarks/results/cpu/train_step.json")
    torch.set_num_threads(a.threads)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - {"compact", "compact_cached", "dense", "dense_cached"})
    if bad:
        ap.error(f"--variants: unknown {bad}")
    shapes = a.shapes or (["minilm-l6"] if a.quick else ["minilm-l6", "bert-base"])
    sps = a.sparsities if a.sparsities is not None else ([0.0, 0.9] if a.quick else [0.0, 0.5, 0.7, 0.9, 0.95])
    batch, seq = a.batch or (8 if a.quick else 32), a.seq or (64 if a.quick else 128)
    reps = a.reps or (1 if a.quick else 3)
    if a.precisions:
        precision_main(a, shapes, sps, batch, seq, reps if a.reps else (5 if a.quick else 9))
        return
    rows = []
    target = max([x for x in sps if x < 1.0] + [0.0])
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, data = make_inputs(Path(tmp), shape, batch, seq)
            for vi, v in enumerate(variants):
                tr = trainer_for(model_dir, data, Path(tmp) / f"run_{v}", batch, seq, v, target)
                bt = example_batch(tr, batch)
                if vi == 0:
                    plain = timeit(plain_step_fn(model_dir, bt), a.warmup, reps)
                    print(f"{shape}: plain dense step {plain['median_s']:.3f} s", flush=True)
                    rows.append({"shape": shape, "provider": "hf_plain_dense", "sparsity": None, **plain})
                    from cofi.training.task import forward

                    def teacher_fwd(teacher=tr.ctx.objective.teacher):
                        with torch.no_grad():
                            forward(teacher, bt, hidden=True)
                    tf = timeit(teacher_fwd, a.warmup, reps)
                    print(f"{shape}: teacher forward {tf['median_s']:.3f} s", flush=True)
                    rows.append({"shape": shape, "provider": "teacher_forward", "sparsity": None, **tf})
                ms = tr.ctx.maskset
                for sp in sps:
                    es = set_sparsity(ms, sp)
                    la0 = ms.log_alpha.detach().clone()
                    with torch.no_grad():
                        zs = ms.sample(generator=torch.Generator().manual_seed(5))
                        live = {g: float((t != 0).float().mean()) for g, t in zs.items()}

                    def restore(ms=ms, la0=la0):  # keep the sparsity level fixed across repetitions
                        with torch.no_grad():
                            ms.log_alpha.copy_(la0)
                    cops.reset_stats()
                    r = timeit(lambda: tr.train_step(bt, 0), a.warmup, reps, after=restore)
                    ran = sorted({f"{op}:{be}" for (op, be, *_), _ in cops.backend_stats().items()})
                    name = f"cofi_{v.split('_')[0]}" + ("_cached_teacher" if v.endswith("_cached") else "")
                    rows.append({"shape": shape, "provider": name, "sparsity": sp, "expected_sparsity": es,
                                 "live_fraction_sampled": live, "ratio_vs_plain": r["median_s"] / plain["median_s"],
                                 "backends": ran, "step": "Trainer.train_step", **r})
                    print(f"{shape} s={sp:.2f} (exp {es:.3f}) {name:28s} {r['median_s']:.3f} s  "
                          f"{r['median_s'] / plain['median_s']:.2f}x plain", flush=True)
                tr.release()
                del tr
    meta = {**H.env_tags("cpu"),  # git sha, device name; the keys below as before (timestamp in UTC)
            "torch": torch.__version__, "cofi": cofi.__version__, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "batch": batch, "seq": seq, "quick": a.quick, "amortize_epochs": a.amortize_epochs,
            "lagrangian_target": target,
            "timestamp": datetime.now(timezone.utc).isoformat(), "device": "cpu"}
    out = H.write_result("train_step", {"meta": meta, "rows": rows}, "cpu", a.out, indent=1)
    E = a.amortize_epochs
    names = {"compact": "cofi_compact", "compact_cached": "cofi_compact_cached_teacher", "dense": "cofi_dense",
             "dense_cached": "cofi_dense_cached_teacher"}
    cols = [v for v in ("compact", "compact_cached", "dense", "dense_cached") if v in variants]
    head = ["shape", "sparsity", *[f"{v} (s)" for v in cols], "plain HF (s)", *[f"{v} / plain" for v in cols]]
    if "compact_cached" in cols:
        head.append(f"compact_cached + pass/{E:g} / plain")
    pairs = [(a_, b_) for a_, b_ in (("compact", "dense"), ("compact_cached", "dense_cached"), ("compact_cached", "dense"))
             if a_ in cols and b_ in cols]
    head += [f"{b_} / {a_}" for a_, b_ in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape in shapes:
        get = lambda prov, s=None: next((r for r in rows if r["shape"] == shape and r["provider"] == prov  # noqa: E731
                                         and r["sparsity"] == s), None)
        plain, tfw = get("hf_plain_dense")["median_s"], get("teacher_forward")["median_s"]
        for s in sps:
            t = {v: get(names[v], s)["median_s"] for v in cols}
            es = get(names[cols[0]], s)["expected_sparsity"]
            cells = [shape, f"{s:.2f} (exp {es:.3f})", *[f"{t[v]:.2f}" for v in cols], f"{plain:.2f}",
                     *[f"{t[v] / plain:.2f}x" for v in cols]]
            if "compact_cached" in cols:
                cells.append(f"{(t['compact_cached'] + tfw / E) / plain:.2f}x")
            cells += [f"{t[b_] / t[a_]:.2f}x" for a_, b_ in pairs]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"| {shape} | teacher forward alone: {tfw:.2f} s = {tfw / plain:.2f}x plain |" + " |" * (len(head) - 2))
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"batch {batch} x {seq}, {meta['threads']} threads, torch {meta['torch']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
