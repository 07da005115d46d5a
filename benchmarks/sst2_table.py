"""The SST-2 table (issue 9): MiniLM-L6 teacher fine-tuned on GLUE SST-2, CoFi to 60/90/95% sparsity,
each followed by compact fine-tuning; dev accuracy, real sparsity and compact-vs-teacher latency,
next to the paper's BERT-base rows.

    python benchmarks/sst2_table.py                 # all stages (resumable: re-run after a kill)
    python benchmarks/sst2_table.py --stage table   # only re-measure latency and re-write the table

Data: ../shared/data/sst2 (read in place). Subsets (CPU budget, documented in benchmarks/README.md):
the teacher sees the first ``--teacher-samples`` training sentences for one epoch, each pruning run the
first ``--prune-samples`` for ``--prune-epochs`` (Lagrangian warm-up over the first half), then one
compact fine-tuning epoch on the same subset. Dev = the full 872-sentence GLUE dev set.
Writes runs/sst2/... and benchmarks/results/cpu/sst2_table.json (with ``_harness.env_tags``); prints
the markdown table. Stages are whole ``cofi`` processes (wall time); latency is cofi.pipeline.latency,
teacher and compact interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

PAPER = {0.6: (93.0, 2.1), 0.95: (90.4, 12.2)}  # BERT-base CoFi rows: SST-2 dev acc, speedup
SPARSITIES = (0.6, 0.9, 0.95)


def cli(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "cofi.cli", *args, "--resume"]
    print("+", " ".join(cmd), f"> {log}", flush=True)
    f = open(log, "a")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait(procs: dict, wall: dict, t0: dict) -> None:
    for name, p in procs.items():
        rc = p.wait()
        wall[name] = time.perf_counter() - t0[name]
        print(f"  {name} done in {wall[name]:.0f} s (rc={rc})", flush=True)
        if rc != 0:
            raise SystemExit(f"stage {name} failed (rc={rc}); see its log")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "sst2"))
    ap.add_argument("--stage", choices=["all", "table"], default="all")
    ap.add_argument("--teacher-samples", type=int, default=20000)
    ap.add_argument("--prune-samples", type=int, default=16000)
    ap.add_argument("--prune-epochs", type=float, default=2.0)
    ap.add_argument("--warmup-epochs", type=float, default=None, help="Lagrangian warm-up (default: half the run)")
    ap.add_argument("--compact-epochs", type=float, default=1.0)
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pad", type=int, default=None,
                    help="time the compact models after CompactModel.pad_(PAD) (exact; e.g. 64)")
    ap.add_argument("--jobs", type=int, default=1, help="pruning runs at once (threads are split between them)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from cofi.pipeline import minilm_path

    common = ["--task", "sst2", "--max-seq-length", "64", "--batch-size", "32", "--eval-batch-size", "128",
              "--seed", "42", "--num-threads", str(args.threads), "--progress", "false"]
    wall, t0 = {}, {}
    if args.stage == "all":
        if not (out / "teacher" / "results.json").exists():
            t0["teacher"] = time.perf_counter()
            wait({"teacher": cli("finetune", "--preset", "teacher", "--model", minilm_path(), "--output-dir",
                                 str(out / "teacher"), "--max-train-samples", str(args.teacher_samples), "--epochs", "1",
                                 "--learning-rate", "5e-5", "--eval-steps", "200", "--save-steps", "200", *common,
                                 log=out / "teacher.log")}, wall, t0)
        todo = [s for s in args.sparsities if not (out / f"prune_{s}" / "results.json").exists()]
        threads = str(max(1, args.threads // max(1, args.jobs)))
        for i in range(0, len(todo), args.jobs):
            procs = {}
            for s in todo[i:i + args.jobs]:
                t0[f"prune_{s}"] = time.perf_counter()
                # the student starts from the fine-tuned teacher, as in the paper
                procs[f"prune_{s}"] = cli(
                    "prune", "--preset", "demo", "--model", str(out / "teacher" / "best"),
                    "--teacher", str(out / "teacher" / "best"), "--output-dir", str(out / f"prune_{s}"),
                    "--target-sparsity", str(s), "--max-train-samples", str(args.prune_samples),
                    "--epochs", str(args.prune_epochs), "--lagrangian-warmup-epochs",
                    str(args.warmup_epochs if args.warmup_epochs is not None else args.prune_epochs / 2),
                    "--compact-epochs", str(args.compact_epochs),
                    *common, "--num-threads", threads, log=out / f"prune_{s}.log")
            wait(procs, wall, t0)
    table(out, wall, args.threads, args.pad)
    return 0


def table(out: Path, wall: dict, threads: int, pad: int | None = None) -> None:
    import torch

    import _harness as H

    from cofi.pipeline import latency
    from cofi.runtime import CompactModel
    from cofi.training.modeling import load_model

    torch.set_num_threads(threads)
    teacher = load_model(str(out / "teacher" / "best"), qa=False, num_labels=2).eval()
    t_res = json.loads((out / "teacher" / "results.json").read_text())
    rows = []
    compacts = {}
    for s in SPARSITIES:
        d = out / f"prune_{s}"
        if (d / "results.json").exists():
            compacts[s] = CompactModel.from_pretrained(str(d / "compact"), pad=pad).eval()
    lat = {}
    for b in (32, 1):
        ids = torch.randint(1000, teacher.config.vocab_size, (b, 128), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        reps = 7 if b == 32 else 30
        # interleave teacher and compact timings so that machine noise hits both alike
        tt, tc = {s: [] for s in compacts}, {s: [] for s in compacts}
        for _ in range(3):
            for s, m in compacts.items():
                tt[s].append(latency(teacher, batch, reps, warmup=1))
                tc[s].append(latency(m, batch, reps, warmup=1))
        lat[b] = {s: (min(tt[s]), min(tc[s])) for s in compacts}
    for s, m in compacts.items():
        r = json.loads((out / f"prune_{s}" / "results.json").read_text())
        rows.append({"target": s, "real_sparsity": m.sparsity(), "encoder_params": m.num_encoder_params(),
                     "dev_acc": r["compact"]["best_metric"], "prune_best_dev_acc": r["prune"]["best_metric"],
                     "speedup_b32": lat[32][s][0] / lat[32][s][1], "speedup_b1": lat[1][s][0] / lat[1][s][1],
                     "teacher_ms_b32": lat[32][s][0] * 1e3, "compact_ms_b32": lat[32][s][1] * 1e3,
                     "teacher_ms_b1": lat[1][s][0] * 1e3, "compact_ms_b1": lat[1][s][1] * 1e3,
                     "paper_bert_base": PAPER.get(s)})
    res = {"teacher_dev_acc": t_res["best_metric"], "rows": rows, "stage_wall_s": wall, "threads": threads,
           "torch": torch.__version__, "compact_pad": pad,
           "compact_backend": {str(s): m.last_backend for s, m in compacts.items()}, "env": H.env_tags("cpu")}
    dst = ROOT / "benchmarks" / "results" / "cpu" / "sst2_table.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    from cofi.pipeline import plots

    for s in compacts:  # dev accuracy + sparsity over steps, lambdas, per-layer structure
        res.setdefault("plots", []).extend(
            os.path.relpath(f, ROOT) for f in plots(dst.parent, out / f"prune_{s}" / "metrics.jsonl", f"sst2_{s}_"))
    old = json.loads(dst.read_text()) if dst.exists() else {}
    res["stage_wall_s"] = {**old.get("stage_wall_s", {}), **wall}
    H.write_result("sst2_table", res, "cpu", dst, indent=2)
    print(f"\nteacher (MiniLM-L6 fine-tuned on SST-2): dev acc {100 * t_res['best_metric']:.2f}\n")
    print("| target | real sparsity | encoder params | dev acc | vs teacher | speedup 32x128 | speedup 1x128 "
          "| paper BERT-base (acc, speedup) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = f"{r['paper_bert_base'][0]}, {r['paper_bert_base'][1]}x" if r["paper_bert_base"] else "-"
        print(f"| {r['target']:.0%} | {r['real_sparsity']:.3f} | {r['encoder_params']:,} | {100 * r['dev_acc']:.2f} "
              f"| {100 * (r['dev_acc'] - t_res['best_metric']):+.2f} | {r['speedup_b32']:.2f}x | {r['speedup_b1']:.2f}x "
              f"| {p} |")
    print(f"\nwritten {dst}")


if __name__ == "__main__":
    raise SystemExit(main())
