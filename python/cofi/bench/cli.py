"""``cofi bench``: the op microbenchmarks on this machine, as a table of same-run ratios.

Each op's providers (the eager reference, torch baselines such as SDPA on all heads or a dense FFN,
and every cofi backend that can run here) are checked against the reference, then timed; ratios are
baseline p50 / provider p50 within this run (above 1: the provider is faster). ``ran`` is the backend
that executed; ``*`` marks the provider ``auto`` picks for that call.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..errors import UserError
from . import OPS, Settings, bench, harness, run as run_bench, table_rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", nargs="+", choices=OPS, default=list(OPS), metavar="OP",
                   help=f"ops to benchmark (default: all of {', '.join(OPS)})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="input dtype (hard_concrete always runs in float32)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases and shorter timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timing per provider and mode (default 1.0, 0.2 with --quick)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the result rows and environment to PATH (a new file)")


def _settings(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"bench: --device cuda, but torch {torch.__version__} sees no CUDA device "
                        f"(CUDA build: {torch.version.cuda or 'none'})")
    dtype = DTYPES[args.dtype]
    if dtype == torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"bench: --dtype bfloat16, but {torch.cuda.get_device_name()} does not support bfloat16")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"bench: --threads must be >= 1, got {args.threads}")
    if args.min_run_time is not None and not args.min_run_time > 0:
        raise UserError(f"bench: --min-run-time must be > 0 seconds, got {args.min_run_time}")
    return Settings(device, dtype, args.quick, args.min_run_time)


def _json_path(text: str | None) -> Path | None:
    if text is None:
        return None
    path = Path(text)
    if path.exists():
        raise UserError(f"bench: --json {text} already exists (a run never overwrites another run's file)")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"bench: --json {text}: {path.parent} is not a directory")
    return path


def run(args: argparse.Namespace) -> int:
    s = _settings(args)
    out_path = _json_path(args.json)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = harness.env_tags(s.device)
    print(f"cofi bench on {env['device_name']} ({s.device}), {args.dtype}, torch {env['torch']}, "
          f"{env['threads']} threads, cofi {env['cofi']} (git {env['git_sha']})" + (", quick" if s.quick else ""))
    rows, t0 = [], time.perf_counter()
    for op in args.op:
        b = bench(op)
        op_rows = run_bench(b, s)
        rows += op_rows
        print()
        print(b.doc)
        cols = ["case", "mode", "dtype", "provider", "ran", "p50 ms"] + [f"vs {x}" for x in b.baselines]
        print(harness.format_table(table_rows(op_rows, b.baselines), cols))
    print(f"\nvs X = X's p50 / this p50 in this run (above 1: faster than X); * = what auto picks; "
          f"{time.perf_counter() - t0:.0f} s")
    if out_path is not None:
        harness.write_result(out_path, {"bench": "cofi bench", "env": env, "device": s.device, "dtype": args.dtype,
                                        "quick": s.quick, "ops": args.op, "rows": rows}, newline=True)
        print(f"wrote {out_path}")
    bad = [r for r in rows if "error" in r]
    return 1 if bad else 0


__all__ = ["add_arguments", "run"]
