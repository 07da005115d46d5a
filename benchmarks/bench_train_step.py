"""One full CoFi pruning step, compacted vs dense-masked vs a plain dense fine-tuning step.

The CoFi step (cofi-reference.md sections 2-3): sample all masks (one fused op), teacher forward
(no grad, no masks), student forward + backward with the masks (``backend="compact"`` or
``backend="dense"``, the reference's method), prediction KL (T = 2) + layer distillation (v3 argmin
matching over teacher layers, identity-initialised projection), Lagrangian, gradient clipping
(model, 1.0), three AdamW optimisers (model: fused, embeddings frozen; log_alpha; lambdas by
gradient ascent), log_alpha clamp. The plain step: transformers' BertForSequenceClassification
(SDPA) forward + cross-entropy + backward + clip + fused AdamW over all parameters, same batch.

Sparsity levels: 0 = a fresh MaskSet (reference init, clamped as after the first step); s > 0 =
log_alphas set to the clamp bounds, a random fraction f of head / FFN units and f^(1/4) of hidden
dims "on" (+4.6), the rest "off" (-4.6; still sampled nonzero with p = 0.047), layer gates on, f
found by bisection so the expected sparsity equals s. Masks are sampled fresh every step.

Teacher: a forward pass per step (the reference), or the trainer's teacher cache (one pass per
example per run; its cost amortised over `--amortize-epochs` in the table).

Run: PYTHONPATH=python:. python benchmarks/bench_train_step.py [--quick]
Writes benchmarks/results/cpu/train_step.json (and a markdown table next to it).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path += [str(ROOT / "python"), str(ROOT)]  # PYTHONPATH (if set) wins

import cofi  # noqa: E402
from cofi import ops as cops  # noqa: E402
from cofi import data as D  # noqa: E402
from cofi.masks import MaskSet  # noqa: E402
from cofi.models import CoFiBertForSequenceClassification  # noqa: E402
from cofi.training.losses import (default_teacher_layers, identity_projection, layer_distill_loss,  # noqa: E402
                                  prediction_distill_loss)
from cofi.training.teacher_cache import TeacherCache  # noqa: E402
from cofi.training.trainer import forward  # noqa: E402

SHAPES = {
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
}
LOGA_ON, LOGA_OFF = math.log(100.0), math.log(0.01)


def set_sparsity(ms: MaskSet, s: float, seed: int = 0) -> float:
    """Set log_alphas so the expected sparsity is ~s (see module docstring); returns it."""
    ms.reset_parameters(torch.Generator().manual_seed(seed))
    ms.clamp_()
    if s <= 0:
        return float(ms.expected_sparsity()[1])
    g = torch.Generator().manual_seed(seed)
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


def timeit(fn, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))]  # noqa: E731
    return {"median_s": statistics.median(ts), "p10_s": q(0.1), "p90_s": q(0.9), "reps": reps, "all_s": ts}


def build(shape: str, batch: int, seq: int, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, num_labels=2, attn_implementation="sdpa", **SHAPES[shape])
    torch.manual_seed(seed)
    hf = BertForSequenceClassification(cfg).train()
    student = CoFiBertForSequenceClassification(cfg).train()
    student.load_state_dict(hf.state_dict(), strict=False)
    teacher = CoFiBertForSequenceClassification(cfg).eval()
    teacher.load_state_dict(hf.state_dict(), strict=False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    tt = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.randint(0, 2, (batch,), generator=g)
    return cfg, hf, student, teacher, (ids, am, tt), labels


def plain_step_fn(hf, batch, labels):
    opt = torch.optim.AdamW(hf.parameters(), lr=2e-5, fused=True)
    ids, am, tt = batch

    def step():
        out = hf(input_ids=ids, attention_mask=am, token_type_ids=tt)
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def teacher_cache_for(teacher, batch, layers) -> TeacherCache:
    """The trainer's cache (teacher_cache.py) built for the examples of ``batch``."""
    ids, am, tt = batch
    lens = am.sum(1).tolist()
    enc = D.Encoded(input_ids=[r[:n] for r, n in zip(ids.tolist(), lens)],
                    token_type_ids=[r[:n] for r, n in zip(tt.tolist(), lens)], labels=None)
    return TeacherCache.build(teacher, enc, layers, len(lens), torch.device("cpu"), forward)


def cofi_step_fn(cfg, student, teacher, ms: MaskSet, batch, mode: str, target: float, cached: bool = False):
    for n, p in student.named_parameters():
        p.requires_grad_("embeddings" not in n)  # CoFi freezes embeddings: no grads computed at all
    proj = identity_projection(cfg.hidden_size)
    params = [p for p in student.parameters() if p.requires_grad] + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=2e-5, fused=True)
    opt_l0 = torch.optim.AdamW([ms.log_alpha], lr=0.01, weight_decay=0.0)
    opt_lam = torch.optim.AdamW([ms.lambda_1, ms.lambda_2], lr=0.01, weight_decay=0.0)
    layers = default_teacher_layers(cfg.num_hidden_layers)
    ids, am, tt = batch
    gen = torch.Generator().manual_seed(1)
    la0 = ms.log_alpha.detach().clone()

    cache = teacher_cache_for(teacher, batch, layers) if cached else None
    rows = np.arange(ids.shape[0])

    def step():
        z = ms.sample(generator=gen)
        if cache is not None:
            t = cache.lookup(rows, am)
        else:
            with torch.no_grad():
                t = teacher(ids, am, tt, output_hidden_states=True)
        out = student(ids, am, tt, masks=z, backend=mode, output_hidden_states=True)
        l_pred = prediction_distill_loss(out.logits, t.logits, 2.0)
        l_layer, _ = layer_distill_loss(out.hidden_states, t.hidden_states, proj, layers,
                                        student_index=out.hidden_index, token_mask=am)
        lag, _ = ms.lagrangian(target)
        loss = 0.5 * l_pred + 0.5 * l_layer + lag
        loss.backward()
        ms.ascend_lambdas_()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt_l0.step()
        opt_lam.step()
        ms.clamp_()
        opt.zero_grad(set_to_none=True)
        opt_l0.zero_grad(set_to_none=True)
        opt_lam.zero_grad(set_to_none=True)
        with torch.no_grad():  # keep the sparsity level fixed across repetitions
            ms.log_alpha.copy_(la0)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM shape, batch 8 x 64, sparsity 0 and 0.9, 1 rep")
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
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu/train_step.json"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - {"compact", "compact_cached", "dense", "dense_cached"})
    if bad:
        ap.error(f"--variants: unknown {bad}")
    shapes = a.shapes or (["minilm-l6"] if a.quick else ["minilm-l6", "bert-base"])
    sps = a.sparsities if a.sparsities is not None else ([0.0, 0.9] if a.quick else [0.0, 0.5, 0.7, 0.9, 0.95])
    batch, seq = a.batch or (8 if a.quick else 32), a.seq or (64 if a.quick else 128)
    reps = a.reps or (1 if a.quick else 3)
    rows = []
    for shape in shapes:
        cfg, hf, student, teacher, bt, labels = build(shape, batch, seq)
        plain = timeit(plain_step_fn(hf, bt, labels), a.warmup, reps)
        print(f"{shape}: plain dense step {plain['median_s']:.3f} s", flush=True)
        rows.append({"shape": shape, "provider": "hf_plain_dense", "sparsity": None, **plain})
        ids, am, tt = bt

        def teacher_fwd():
            with torch.no_grad():
                teacher(ids, am, tt, output_hidden_states=True)
        tf = timeit(teacher_fwd, a.warmup, reps)
        print(f"{shape}: teacher forward {tf['median_s']:.3f} s", flush=True)
        rows.append({"shape": shape, "provider": "teacher_forward", "sparsity": None, **tf})
        for s in sps:
            ms = MaskSet(student.mask_config())
            es = set_sparsity(ms, s)
            with torch.no_grad():
                zs = ms.sample(generator=torch.Generator().manual_seed(5))
                live = {g: float((t != 0).float().mean()) for g, t in zs.items()}
            for v in variants:
                mode, cached = v.split("_")[0], v.endswith("_cached")
                cops.reset_stats()
                r = timeit(cofi_step_fn(cfg, student, teacher, ms, bt, mode, target=max(s, 0.0), cached=cached),
                           a.warmup, reps)
                ran = sorted({f"{op}:{be}" for (op, be, *_), _ in cops.backend_stats().items()})
                name = f"cofi_{mode}" + ("_cached_teacher" if cached else "")
                rows.append({"shape": shape, "provider": name, "sparsity": s, "expected_sparsity": es,
                             "live_fraction_sampled": live, "ratio_vs_plain": r["median_s"] / plain["median_s"],
                             "backends": ran, **r})
                print(f"{shape} s={s:.2f} (exp {es:.3f}) {name:28s} {r['median_s']:.3f} s  "
                      f"{r['median_s'] / plain['median_s']:.2f}x plain", flush=True)
        del hf, student, teacher
    meta = {"torch": torch.__version__, "cofi": cofi.__version__, "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "batch": batch, "seq": seq, "quick": a.quick, "amortize_epochs": a.amortize_epochs,
            "timestamp": datetime.now(timezone.utc).isoformat(), "device": "cpu"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
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
