"""The benchmark scripts' harness: ``cofi.bench.harness`` (timing, checks, result files) with this
folder's defaults (results/<device>/<name>.json) and the scripts' common arguments.

Timing uses torch.utils.benchmark (CPU and GPU). Each case reports p50 with p20/p80 in ms; ratios
are only ever taken between providers timed in the same run. Row-list results are merged on
(op, provider, mode, shape, dtype, device) so reruns replace their own rows (``write_rows``); a
benchmark with its own layout writes one JSON object per run (``write_result``), with ``env_tags``.
The op benchmarks themselves live in ``cofi.bench`` (``run_op_script`` runs one as a script).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cofi.bench import harness as _h
from cofi.bench.harness import (  # noqa: F401  re-exported for the scripts
    check_close,
    check_rel,
    device_name,
    env_tags,
    env_var,
    format_table,
    measure,
    print_table,
    time_interleaved,
)

RESULTS = Path(__file__).parent / "results"


def base_parser(description: str, cpu_only: bool = False) -> argparse.ArgumentParser:
    """--quick, --threads, --out and (unless ``cpu_only``: the CPU benchmarks timed in interleaved
    rounds or whole steps, whose ``args.device`` is then always "cpu") --device and --min-run-time."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sweep that finishes fast on CPU")
    if cpu_only:
        p.set_defaults(device="cpu", min_run_time=None)
    else:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2 on the reference machine)")
    if not cpu_only:
        p.add_argument("--min-run-time", type=float, default=None, help="seconds of timing per case")
    p.add_argument("--out", default=None, help="results file (default results/<device>/<op>.json)")
    return p


def bandwidth(mb: int = 512) -> tuple[float, float]:
    """(read, copy) GB/s: best of 5 ``torch.sum`` over an ``mb`` MiB float32 buffer, best of 5
    copies of ``mb / 2`` MiB (read + write counted). The bound of a weight-streaming benchmark."""
    x = torch.ones(mb * 2 ** 18)
    a, b = x[: x.numel() // 2], torch.empty(x.numel() // 2)
    read = copy = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        b.copy_(a)
        read, copy = min(read, t1 - t0), min(copy, time.perf_counter() - t1)
    return x.numel() * 4 / read / 1e9, 2 * a.numel() * 4 / copy / 1e9


def mem_available() -> int:
    """Bytes of memory the kernel says a new allocation can get (MemAvailable, Linux)."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def write_rows(op: str, rows: list[dict], device: str, out: str | None = None) -> Path:
    """Merge ``rows`` into ``out`` or results/<device>/<op>.json."""
    return _h.write_rows(Path(out) if out else RESULTS / device_name(device) / f"{op}.json", rows)


def write_result(name: str, result: dict, device: str = "cpu", out: str | Path | None = None,
                 indent: int = 1, newline: bool = False) -> Path:
    """Write one run's result (a JSON object, replacing the file) to ``out`` or
    results/<device>/<name>.json, atomically; returns the path."""
    return _h.write_result(Path(out) if out else RESULTS / device_name(device) / f"{name}.json", result, indent,
                           newline)


def run_op_script(op: str) -> None:
    """main() of benchmarks/bench_<op>.py: ``cofi.bench``'s benchmark of ``op``, rows merged into the
    results file (float32 unless --dtype says otherwise)."""
    from cofi.bench import Settings, bench, run, table_rows

    b = bench(op)
    p = base_parser(b.doc)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(b, Settings(args.device, getattr(torch, args.dtype), args.quick, args.min_run_time))
    for r in rows:
        if "error" in r:
            print("WRONG, not timed:", r["provider"], r["case"], r["error"])
    cols = ["case", "mode", "dtype", "provider", "ran", "p50 ms"] + [f"vs {x}" for x in b.baselines]
    print_table(table_rows(rows, b.baselines), cols)
    print("wrote", write_rows(op, [r for r in rows if "p50_ms" in r], args.device, args.out))
