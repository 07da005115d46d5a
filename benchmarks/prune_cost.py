"""Training cost of a CoFi run to 95% sparsity: our compacted steps vs ``mode="dense"`` (the
reference's dense-masked method), same config, seed, data and steps. The two runs go side by side,
one core each (``--threads`` per run), so that machine noise hits both alike.

    python benchmarks/prune_cost.py [--samples 4000] [--epochs 3] [--warmup-epochs 1]

Needs the SST-2 teacher of ``benchmarks/sst2_table.py`` (runs/sst2/teacher/best; the student starts
from it). Subset: the first ``--samples`` SST-2 training sentences; the sparsity schedule has the
shape of the table's 95% run (Lagrangian warm-up over the first ``--warmup-epochs``, then held at
the target). Only the pruning stage is timed (``--skip-compact``; one evaluation at the end).
Writes benchmarks/results/cpu/prune_cost.json.
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "sst2" / "teacher" / "best"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "prune_cost"))
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1, help="threads per run (the two runs go at once)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    steps = int(args.samples // 32 * args.epochs)
    res = {"config": vars(args), "runs": {}}
    procs, t0 = {}, {}
    for mode in ("compact", "dense"):
        out = Path(args.out) / mode
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cofi.cli", "prune", "--preset", "demo", "--task", "sst2", "--model", args.teacher,
               "--teacher", args.teacher, "--output-dir", str(out), "--target-sparsity", str(args.target),
               "--max-train-samples", str(args.samples), "--epochs", str(args.epochs),
               "--lagrangian-warmup-epochs", str(args.warmup_epochs), "--max-seq-length", "64", "--seed", "42",
               "--num-threads", str(args.threads), "--progress", "false", "--skip-compact", "true",
               "--eval-steps", str(steps), "--save-steps", str(steps), "--mode", mode]
        print("+", " ".join(cmd), flush=True)
        t0[mode] = time.perf_counter()
        procs[mode] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(Path(args.out) / f"{mode}.log", "w"),
                                       stderr=subprocess.STDOUT)
    for mode, p in procs.items():
        rc = p.wait()
        wall = time.perf_counter() - t0[mode]
        if rc != 0:
            print(f"{mode} failed (rc={rc}); see {Path(args.out) / (mode + '.log')}")
            return rc
        out = Path(args.out) / mode
        last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
        res["runs"][mode] = {"wall_s": wall, "final_real_sparsity": last.get("real_sparsity"),
                             "final_expected_sparsity": last.get("expected_sparsity"), "final_eval": last.get("eval")}
        print(f"  {mode}: {wall:.0f} s, final real sparsity {last.get('real_sparsity'):.3f}", flush=True)
    r = res["runs"]
    res["dense_over_compact"] = r["dense"]["wall_s"] / r["compact"]["wall_s"]
    print(f"dense / compact wall time: {res['dense_over_compact']:.2f}x")
    dst = ROOT / "benchmarks" / "results" / "cpu" / "prune_cost.json"
    dst.write_text(json.dumps(res, indent=2))
    print("wrote", dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
