"""Training cost of a CoFi run to 95% sparsity: our compacted steps vs ``backend="dense"`` (the
reference's dense-masked method), same config, seed, data and steps. The two runs go side by side,
one core each (``--threads`` per run), so that machine noise hits both alike.

    python benchmarks/prune_cost.py [--samples 4000] [--epochs 3] [--warmup-epochs 1]
    python benchmarks/prune_cost.py --samples 1000 --epochs 20 --warmup-epochs 2 --prepruning-epochs 1 \
        --tag paper_schedule   # the paper's schedule shape (SST-2: 20 epochs, 2 warm-up, 1 pre-pruning)

Needs the SST-2 teacher of ``benchmarks/sst2_table.py`` (runs/sst2/teacher/best; the student starts
from it). Subset: the first ``--samples`` SST-2 training sentences; the sparsity schedule has the
shape of the table's 95% run (Lagrangian warm-up over the first ``--warmup-epochs``, then held at
the target). Only the pruning stage is timed (``--skip-compact``; one evaluation at the end).
Teacher outputs: ``--pairs`` lists the pairs to run, each ``COMPACT_CACHE:DENSE_CACHE`` with
``on`` (cached once per example, ``teacher_cache=on``) or ``off`` (one teacher forward per step, as
the reference does). Default ``on:on,off:off,on:off``: both modes with the cache (same config), both
without, and our full system against the reference's full method. Each pair runs side by side.
Writes benchmarks/results/cpu/prune_cost.json (with ``_harness.env_tags``; the timings are whole
``cofi prune`` processes' wall times, so not ``_harness.measure`` / ``time_interleaved``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "sst2" / "teacher" / "best"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "prune_cost"))
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1, help="threads per run (the two runs go at once)")
    ap.add_argument("--prepruning-epochs", type=float, default=None,
                    help="distillation before masks go on (default: the demo preset's 40 steps)")
    ap.add_argument("--tag", default="", help="results file suffix: results/cpu/prune_cost[_TAG].json")
    ap.add_argument("--pairs", default="on:on,off:off,on:off",
                    help="comma-separated COMPACT_CACHE:DENSE_CACHE pairs (teacher cache on/off per mode)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    spe = -(-args.samples // 32)  # steps per epoch (the last batch may be short)
    steps = int(math.ceil(spe * args.epochs))
    res = {"config": vars(args), "pairs": []}
    for i, pair in enumerate(args.pairs.split(",")):
        caches = dict(zip(("compact", "dense"), pair.split(":")))
        if len(caches) != 2 or not set(caches.values()) <= {"on", "off"}:
            ap.error(f"--pairs: each pair is COMPACT_CACHE:DENSE_CACHE with on/off, got {pair!r}")
        procs, t0, runs = {}, {}, {}
        for mode, cache in caches.items():
            name = f"pair{i}_{mode}_cache_{cache}"
            out = Path(args.out) / name
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "cofi.cli", "prune", "--preset", "demo", "--task", "sst2", "--model",
                   args.teacher, "--teacher", args.teacher, "--output-dir", str(out), "--target-sparsity",
                   str(args.target), "--max-train-samples", str(args.samples), "--epochs", str(args.epochs),
                   "--lagrangian-warmup-epochs", str(args.warmup_epochs), "--max-seq-length", "64", "--seed", "42",
                   "--num-threads", str(args.threads), "--progress", "false", "--skip-compact", "true",
                   "--eval-steps", str(steps), "--save-steps", str(steps), "--backend", mode, "--teacher-cache", cache]
            if args.prepruning_epochs is not None:
                cmd += ["--prepruning-steps", str(int(round(spe * args.prepruning_epochs)))]
            print("+", " ".join(cmd), flush=True)
            t0[name] = time.perf_counter()
            procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(Path(args.out) / f"{name}.log", "w"),
                                           stderr=subprocess.STDOUT)
        for name, p in procs.items():
            rc = p.wait()
            wall = time.perf_counter() - t0[name]
            if rc != 0:
                print(f"{name} failed (rc={rc}); see {Path(args.out) / (name + '.log')}")
                return rc
            out = Path(args.out) / name
            last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
            runs[name] = {"wall_s": wall, "final_real_sparsity": last.get("real_sparsity"),
                          "final_expected_sparsity": last.get("expected_sparsity"), "final_eval": last.get("eval")}
            print(f"  {name}: {wall:.0f} s, final real sparsity {last.get('real_sparsity'):.3f}", flush=True)
        c, d = (runs[f"pair{i}_{m}_cache_{caches[m]}"]["wall_s"] for m in ("compact", "dense"))
        res["pairs"].append({"pair": pair, "runs": runs, "dense_over_compact": d / c})
        print(f"pair {pair}: dense / compact wall time {d / c:.2f}x", flush=True)
    import _harness as H  # torch: not in the parent while the runs go

    res["env"] = H.env_tags("cpu")
    print("wrote", H.write_result(f"prune_cost{'_' + args.tag if args.tag else ''}", res, "cpu", indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
