"""Shared benchmark harness: time providers side by side in one process and write results.

Timing uses torch.utils.benchmark (CPU and GPU). Each case reports p50 with p20/p80 in ms; ratios
are only ever taken between providers timed in the same run. Results go to
benchmarks/results/<device>/<op>.json (list of rows) and are merged on
(op, provider, mode, shape, dtype, device) so reruns replace their own rows (``write_rows``); a
benchmark with its own layout writes one JSON object per run (``write_result``), with ``env_tags``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.utils.benchmark as tb

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


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return "cpu"


def env_tags(device: str) -> dict:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        sha = "unknown"
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    import cofi

    return {"device_name": device_name(device), "torch": torch.__version__, "triton": tv, "cofi": cofi.__version__,
            "git_sha": sha, "threads": torch.get_num_threads(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


def measure(fn: Callable[[], object], min_run_time: float = 1.0, device: str = "cpu") -> dict[str, float]:
    """p20/p50/p80 in milliseconds of ``fn()`` after 2 warm-up calls."""
    for _ in range(2):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)

    def q(p: float) -> float:
        return 1e3 * times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return {"p20_ms": q(0.2), "p50_ms": q(0.5), "p80_ms": q(0.8), "runs": len(times) * m.number_per_run}


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the body (the native ops read their switches, e.g.
    COFI_WORKSPACE, COFI_GEMM_SPLIT, per call), then restore what was there."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def time_interleaved(fns: dict, rounds: int, warmup: int = 2, once: tuple[str, ...] = (),
                     max_sub_rounds: int = 1) -> dict[str, dict[str, float]]:
    """One call of each provider per round, in order; p10/p50/p90 in ms over rounds. Machine noise
    (bursts of other load) then hits every provider alike, which blocked timing of one provider after
    another does not guarantee. With ``max_sub_rounds`` > 1, each round calls the providers named in
    ``once`` (an expensive baseline) once and then the others k times over, still one call of each in
    turn (so no provider runs twice in a row with warm caches), k = the baseline's time over the
    others' in the last warmup round, clamped to [1, max_sub_rounds]: cheap providers get k times the
    samples for about the price of the baseline calls. Each provider's ``n`` says how many it got."""
    spent = {}
    for _ in range(warmup):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            spent[k] = time.perf_counter() - t0
    cheap = [k for k in fns if k not in once]
    sub = 1
    if max_sub_rounds > 1 and once and cheap:
        ratio = sum(spent[k] for k in once) / max(sum(spent[k] for k in cheap), 1e-9)
        sub = max(1, min(max_sub_rounds, round(ratio)))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k in [k for k in fns if k in once] + cheap * sub:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, v in samples.items():
        v = sorted(v)
        q = statistics.quantiles(v, n=10) if len(v) >= 2 else [v[0]] * 9
        out[k] = {"p50_ms": statistics.median(v), "p10_ms": q[0], "p90_ms": q[-1], "n": len(v)}
    return out


def check_close(name: str, got: object, want: object, atol: float, rtol: float) -> str | None:
    """None if close, else a description (a wrong provider is reported, not timed)."""
    gs = got if isinstance(got, (tuple, list)) else (got,)
    ws = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(gs, ws):
        if g is None or w is None:
            continue
        try:
            torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol)
        except AssertionError as e:
            return f"{name}: {str(e).splitlines()[0]}"
    return None


def write_rows(op: str, rows: list[dict], device: str, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / device_name(device) / f"{op}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r.get("op"), r.get("provider"), r.get("mode"), json.dumps(r.get("shape")), r.get("dtype"), r.get("device_name"))  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_result(name: str, result: dict, device: str = "cpu", out: str | Path | None = None,
                 indent: int = 1, newline: bool = False) -> Path:
    """Write one run's result (a JSON object, replacing the file) to ``out`` or
    results/<device>/<name>.json, atomically; returns the path."""
    path = Path(out) if out else RESULTS / device_name(device) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=indent) + ("\n" if newline else ""))
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)))
