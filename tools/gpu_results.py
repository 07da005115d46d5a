"""Copy a tools/gpu_check.sh run's files into benchmarks/results/<device-name>/.

The ``cofi bench --json`` files' timed rows are merged into the device's row-list files
(masked_attention.json, masked_ffn.json, ...; rows of the same op, provider, mode, shape, dtype and
device are replaced, as a rerun of benchmarks/bench_<op>.py does), which benchmarks/report.py renders.
The summary and logs go to logs/gpu_check_<timestamp>_<name>; an existing file is never overwritten.

    python tools/gpu_results.py DIR      # DIR: the $OUT of tools/gpu_check.sh, as fetched
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
from cofi.bench.harness import write_rows  # noqa: E402

LOGS = ("summary.txt", "build.log", "tests.log", "e2e.log", "bench.txt", "sanitizer.log")


def _local_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="the gpu_check output folder")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="results root")
    args = ap.parse_args(argv)
    benches = sorted(args.dir.glob("bench_*.json"))
    if not args.dir.is_dir() or not (benches or (args.dir / "summary.txt").exists()):
        print(f"error: {args.dir}: no gpu_check files (summary.txt, bench_*.json) there", file=sys.stderr)
        return 2
    loaded = [(path, json.loads(path.read_text())) for path in benches]
    if loaded:
        device = loaded[0][1]["env"]["device_name"]
    else:
        lines = (args.dir / "summary.txt").read_text().splitlines()
        device = next((x.split("device: ", 1)[1].split(" (")[0] for x in lines if x.startswith("device: ")),
                      "unknown").replace(" ", "_")
    summary = args.dir / "summary.txt"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(summary.stat().st_mtime if summary.exists() else None))
    logs = args.results / device / "logs"
    copies = [(args.dir / n, logs / f"gpu_check_{stamp}_{n}") for n in LOGS if (args.dir / n).exists()]
    taken = [str(dst) for _, dst in copies if dst.exists()]
    if taken:
        print(f"error: {', '.join(taken)} exist: this run was copied already (nothing written)", file=sys.stderr)
        return 2
    for path, data in loaded:
        rows = [r for r in data["rows"] if "p50_ms" in r]
        for r in rows:
            if r.get("git_sha") in (None, "unknown"):  # the lent machine's copy has no .git
                r["git_sha"] = _local_sha()
        for op in sorted({r["op"] for r in rows}):
            out = write_rows(args.results / device / f"{op}.json", [r for r in rows if r["op"] == op])
            print(f"{path.name}: {sum(r['op'] == op for r in rows)} rows -> {out}")
    logs.mkdir(parents=True, exist_ok=True)
    for src, dst in copies:
        shutil.copyfile(src, dst)
        print(f"{src.name} -> {dst}")
    print("next: .venv/bin/python benchmarks/report.py (tables of benchmarks/results/<device>/ into the README)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
