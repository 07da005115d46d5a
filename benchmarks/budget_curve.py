"""How much accuracy a budget buys (issue 20, item 6): MiniLM-L6 teachers on Rotten Tomatoes (the
default job's data) and GLUE SST-2, CoFi-pruned to 60 % and 90 % with the ``demo`` preset's schedule
scaled by ``--scales`` (0.5 = half the pruning, warm-up, pre-pruning and compact fine-tuning steps),
then compact fine-tuned; dev accuracy (selection), held-out test accuracy where the data has a test
split, delivered sparsity and wall time.

    python benchmarks/budget_curve.py --rt-teacher runs/demo/teacher/best     # all runs (resumable)
    python benchmarks/budget_curve.py --stage table                           # re-score and re-write

Data: Rotten Tomatoes = cofi's fixed seeded split (10,202 / 1,275 / 1,275; the test split is held out).
SST-2 = ../shared/data/sst2, read in place: the teacher sees the first ``--sst2-teacher-samples`` training
sentences for one epoch, each pruning run the first ``--sst2-prune-samples`` (about Rotten Tomatoes'
size, so a scale means the same number of steps on both); GLUE's test labels are not public, so SST-2
reports dev only, which is also the selection set (as the paper does). Runs go ``--jobs`` at a time with
``--threads`` split between them; wall time is per run, as run (stated in the results).
Writes runs/budget_curve/... and benchmarks/results/cpu/budget_curve.json (+ budget_curve.png).
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

DATASETS = {"rt": "rotten_tomatoes", "sst2": "sst2"}
# the demo preset's schedule (python/cofi/training/config_cli.py "demo"); a scale multiplies each
DEMO = {"epochs": 2.0, "lagrangian_warmup_epochs": 1.0, "prepruning_steps": 40, "compact_epochs": 1.0}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def cofi(*args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cofi.cli", *args, "--resume", "--progress", "false"]
    print("+", " ".join(cmd), f"> {log}", flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT)


def run_name(ds: str, target: float, scale: float) -> str:
    return f"{ds}_{target:g}_x{scale:g}"


def prune_args(ds: str, teacher: str, out: Path, target: float, scale: float, threads: int, sst2_n: int) -> list[str]:
    a = ["prune", "--preset", "demo", "--task", DATASETS[ds], "--model", teacher, "--teacher", teacher,
         "--output-dir", str(out / run_name(ds, target, scale)), "--target-sparsity", str(target),
         "--epochs", f"{DEMO['epochs'] * scale:g}",
         "--lagrangian-warmup-epochs", f"{DEMO['lagrangian_warmup_epochs'] * scale:g}",
         "--prepruning-steps", str(round(DEMO["prepruning_steps"] * scale)),
         "--compact-epochs", f"{DEMO['compact_epochs'] * scale:g}", "--seed", "42", "--num-threads", str(threads)]
    if ds == "sst2":
        a += ["--max-train-samples", str(sst2_n)]
    return a


def teachers(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """The teacher folder of each dataset (fine-tuned here unless given)."""
    from cofi.pipeline import minilm_path

    found: dict[str, str] = {}
    procs: dict[str, subprocess.Popen] = {}
    for ds in args.datasets:
        given = getattr(args, f"{ds}_teacher")
        if given:
            found[ds] = given
            continue
        d = out / f"teacher_{ds}"
        found[ds] = str(d / "best")
        if (d / "results.json").exists():
            continue
        # the demo's teacher stage (cofi.pipeline: 1 epoch, lr 5e-5, linear); SST-2 on a subset
        a = ["finetune", "--preset", "teacher", "--task", DATASETS[ds], "--model", minilm_path(), "--output-dir",
             str(d), "--epochs", "1", "--learning-rate", "5e-5", "--max-seq-length", "64", "--batch-size", "32",
             "--eval-batch-size", "128", "--eval-steps", "100", "--save-steps", "100", "--seed", "42",
             "--num-threads", str(max(1, args.threads // len(args.datasets)))]
        if ds == "sst2":
            a += ["--max-train-samples", str(args.sst2_teacher_samples)]
        procs[ds] = cofi(*a, log=out / f"teacher_{ds}.log")
    for ds, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"teacher {ds} failed; see {out / f'teacher_{ds}.log'}")
    return found


def run_all(args: argparse.Namespace, out: Path, tdirs: dict[str, str]) -> None:
    """Every (dataset, target, scale) pruning run, ``--jobs`` at once, longest first."""
    todo = [(ds, t, s) for s in sorted(args.scales, reverse=True) for ds in args.datasets for t in args.targets
            if not (out / run_name(ds, t, s) / "results.json").exists()]
    threads = max(1, args.threads // args.jobs)
    walls_file = out / "wall_s.json"
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            ds, t, s = todo.pop(0)
            name = run_name(ds, t, s)
            running[name] = (cofi(*prune_args(ds, tdirs[ds], out, t, s, threads, args.sst2_prune_samples),
                                  log=out / f"{name}.log"), time.perf_counter())
        time.sleep(2)
        for name, (p, t0) in list(running.items()):
            if p.poll() is None:
                continue
            del running[name]
            if p.returncode != 0:
                raise SystemExit(f"run {name} failed (rc={p.returncode}); see {out / (name + '.log')}")
            record_wall(walls_file, name, {"wall_s": time.perf_counter() - t0, "threads": threads,
                                           "concurrent_runs": args.jobs})
            walls = json.loads(walls_file.read_text())
            print(f"  {name} done in {walls[name]['wall_s']:.0f} s", flush=True)


def record_wall(path: Path, name: str, rec: dict) -> None:
    """Adds one run's wall record to ``path`` under a lock (several invocations may share one --out)."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        walls = json.loads(path.read_text()) if path.exists() else {}
        walls[name] = rec
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(walls, indent=1))
        tmp.replace(path)


def table(args: argparse.Namespace, out: Path, tdirs: dict[str, str]) -> dict:
    """Scores every finished run (test split where the data has one) and writes the results file."""
    import _harness as H
    import torch
    from cofi.pipeline import score_folder, test_split
    from cofi.training.config import TrainConfig

    torch.set_num_threads(args.threads)
    walls = json.loads((out / "wall_s.json").read_text()) if (out / "wall_s.json").exists() else {}
    rows, teach = [], {}
    for ds in args.datasets:
        cfg = TrainConfig(task=DATASETS[ds], max_seq_length=64, eval_batch_size=128)
        data = test_split(cfg, None)
        t_res = json.loads((Path(tdirs[ds]).parent / "results.json").read_text())
        teach[ds] = {"dir": tdirs[ds], "dev": t_res["best_metric"],
                     "test": score_folder(Path(tdirs[ds]), data, cfg)["accuracy"] if data is not None else None}
        for t in args.targets:
            for s in sorted(args.scales):
                d = out / run_name(ds, t, s)
                if not (d / "results.json").exists():
                    continue
                r = json.loads((d / "results.json").read_text())
                comp = Path(r["compact"]["dir"])
                if not comp.is_absolute():  # relative to the process that ran it (the default job's run)
                    comp = d / "compact"
                test = score_folder(comp, data, cfg)["accuracy"] if data is not None else None
                rows.append({"dataset": ds, "target": t, "scale": s, "prune_steps": r["prune"].get("steps"),
                             "real_sparsity": r["compact"]["sparsity"],
                             "dev": r["compact"]["best_metric"], "prune_best_dev": r["prune"]["best_metric"],
                             "test": test, "drop_dev": teach[ds]["dev"] - r["compact"]["best_metric"],
                             "drop_test": None if test is None else teach[ds]["test"] - test,
                             **walls.get(run_name(ds, t, s), {})})
    res = {"teachers": teach, "rows": rows, "schedule_unit": DEMO, "scales": sorted(args.scales),
           "sst2_prune_samples": args.sst2_prune_samples, "sst2_teacher_samples": args.sst2_teacher_samples,
           "jobs": args.jobs, "threads": args.threads, "wall_note": args.wall_note, "env": H.env_tags("cpu")}
    dst = ROOT / "benchmarks" / "results" / "cpu" / "budget_curve.json"
    res["plot"] = os.path.relpath(plot(res, dst.with_suffix(".png")), ROOT)
    H.write_result("budget_curve", res, "cpu", dst, indent=2)
    for r in rows:
        print(f"{r['dataset']:5s} {r['target']:.0%} x{r['scale']:<4g} sparsity {r['real_sparsity']:.4f} dev "
              f"{100 * r['dev']:.2f} (drop {100 * r['drop_dev']:.2f})"
              + (f" test {100 * r['test']:.2f} (drop {100 * r['drop_test']:.2f})" if r["test"] is not None else "")
              + (f" wall {r['wall_s']:.0f} s" if "wall_s" in r else ""))
    print(f"written {dst}")
    return res


def plot(res: dict, path: Path) -> Path:
    """Accuracy drop vs the teacher against the schedule length (walls overlapped: not the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ds in res["teachers"]:
        for t in sorted({r["target"] for r in res["rows"]}):
            pts = sorted((r["scale"], r["drop_test"] if r["drop_test"] is not None else r["drop_dev"])
                         for r in res["rows"] if r["dataset"] == ds and r["target"] == t)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o",
                        label=f"{ds} {t:.0%} ({'test' if res['teachers'][ds]['test'] is not None else 'dev'})")
    ax.axhline(3.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("schedule length (x the demo preset's)")
    ax.set_ylabel("accuracy drop vs teacher (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "budget_curve"))
    ap.add_argument("--stage", choices=["all", "table"], default="all")
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.9])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--rt-teacher", default=None, help="a fine-tuned Rotten Tomatoes teacher folder (e.g. runs/demo/teacher/best)")
    ap.add_argument("--sst2-teacher", default=None, help="a fine-tuned SST-2 teacher folder")
    ap.add_argument("--sst2-teacher-samples", type=int, default=20000)
    ap.add_argument("--sst2-prune-samples", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--wall-note", default=None, help="how the runs shared the machine (stated with the wall times)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tdirs = teachers(args, out)
    if args.stage == "all":
        run_all(args, out, tdirs)
    table(args, out, tdirs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
