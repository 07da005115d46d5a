"""Timing, checking and result writing shared by ``cofi bench`` and the scripts in benchmarks/.

Timing uses torch.utils.benchmark (it synchronises CUDA around each block). Each case reports p50
with p20/p80 in ms; ratios are only ever taken between providers timed in the same run. Row lists
(one dict per op x provider x mode x shape x dtype) are merged into a results file on that key
(``write_rows``), so a rerun replaces its own rows; a benchmark with its own layout writes one JSON
object per run (``write_result``). Every row carries ``env_tags``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.utils.benchmark as tb

Row = dict


def device_name(device: str) -> str:
    """'cpu', or the GPU's name with spaces as underscores (the results folder of a device)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return "cpu"


def git_sha() -> str:
    """Short git sha of the checkout cofi is imported from ('unknown' for an installed copy)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=Path(__file__).resolve().parent).strip()
    except Exception:
        return "unknown"


def env_tags(device: str) -> dict:
    """What a result was measured with: device, versions, git sha, threads, time."""
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    import cofi

    return {"device_name": device_name(device), "torch": torch.__version__, "triton": tv, "cofi": cofi.__version__,
            "git_sha": git_sha(), "threads": torch.get_num_threads(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}


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
    samples for about the price of the baseline calls. Each provider's ``n`` says how many it got.
    p10/p90 interpolate between samples (``method="inclusive"``): with few rounds the default
    "exclusive" method extrapolates past the fastest / slowest sample, even below zero."""
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
        q = statistics.quantiles(v, n=10, method="inclusive") if len(v) >= 2 else [v[0]] * 9
        out[k] = {"p50_ms": statistics.median(v), "p10_ms": q[0], "p90_ms": q[-1], "n": len(v)}
    return out


def check_close(name: str, got: object, want: object, atol: float, rtol: float) -> str | None:
    """None if every tensor pair is close elementwise, else a one-line description."""
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


# ||got - want|| / ||want|| allowed per dtype of the provider's inputs (vs a reference computed from the
# same inputs): float32 accumulation-order error, half precision rounding of the inputs and output
REL_ERR = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def check_rel(name: str, got: Sequence[torch.Tensor | None], want: Sequence[torch.Tensor | None],
              dtype: torch.dtype) -> str | None:
    """None if every pair has a relative L2 error within ``REL_ERR[dtype]`` and no NaN, else one line."""
    bound = REL_ERR[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None or w.numel() == 0:
            continue
        g64, w64 = g.detach().double(), w.detach().double()
        if not torch.isfinite(g64).all():
            return f"{name}: output {i} has NaN or inf"
        err = float((g64 - w64).norm() / w64.norm().clamp_min(1e-30))
        if not err <= bound or math.isnan(err):
            return f"{name}: output {i} relative error {err:.2e} > {bound:.0e}"
    return None


def write_rows(path: str | Path, rows: list[Row]) -> Path:
    """Merge ``rows`` into the row list at ``path`` (rows with the same op, provider, mode, shape,
    dtype and device replace the old ones), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r.get("op"), r.get("provider"), r.get("mode"), json.dumps(r.get("shape")), r.get("dtype"),  # noqa: E731
                     r.get("device_name"))
    new_keys = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in new_keys] + rows
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_result(path: str | Path, result: dict, indent: int = 1, newline: bool = False) -> Path:
    """Write one run's result (a JSON object, replacing the file) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=indent) + ("\n" if newline else ""))
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict], cols: list[str]) -> str:
    """Left-aligned plain-text table of ``cols`` (missing cells empty)."""
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(cols, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(format_table(rows, cols))
