"""Few-row decode projections: cofi::decode_linear vs torch's F.linear, against the read-bandwidth bound.

A decoding step's projections multiply 1-8 rows by weights that do not fit in cache, so their speed
is the rate at which the weight streams from memory. Providers per case, timed interleaved in one
process (one sample of each per round, median):

- decode_linear: ``torch.ops.cofi.decode_linear(x, w, None)`` (csrc/decode_linear/decode_linear_cpu.cpp:
                 each weight read once, float32 accumulation, the result rounded once);
- f_linear:      ``F.linear(x, w)`` on the same weight (torch's GEMV / GEMM in that dtype).

The weights stream from memory, not cache: every case holds enough clones of its weight that they
total more than 256 MiB (8x the L3 of the reference machine), and the providers share one cursor
that cycles through them, so no call finds its weight in cache. One sample = consecutive calls on
as many clones as make >= 8 MiB (small weights: the timer's cost amortised); times are per call.
Before timing, both providers' outputs are checked against float64 (relative L2 within CHECK_REL).

Bound: the read bandwidth measured in the same run (best of 5 ``torch.sum`` over a 512 MiB float32
buffer, ``_harness.bandwidth``, at the start and the end of the run; the higher one is used):
bound time = weight bytes / bandwidth (x and y are a few KiB); GB/s = weight bytes / p50; reached =
GB/s / read bandwidth.

Cases: SmolLM2-135M's projections (q/k/v fused, o, gate/up fused, down) dense and at 50 % structured
sparsity, its tied LM head, and (full run only, when memory allows) a Llama-3.2-1B LM head; rows 1
and 8; float32 and bfloat16; no bias (Llama has none).

    python benchmarks/bench_decode_linear.py [--quick] [--threads 2]

Writes results/cpu/decode_linear.json (--quick: decode_linear_quick.json, SmolLM2 dense only).
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H
import cofi  # noqa: F401  (loads cofi._C, which registers cofi::decode_linear)

# (model, sparsity, projection, N, K): weight [N, K]
SMOLLM2 = [("SmolLM2-135M", 0.0, "qkv", 960, 576), ("SmolLM2-135M", 0.0, "o", 576, 576),
           ("SmolLM2-135M", 0.0, "gate_up", 3072, 576), ("SmolLM2-135M", 0.0, "down", 576, 1536)]
SMOLLM2_50 = [("SmolLM2-135M", 0.5, "qkv", 768, 576), ("SmolLM2-135M", 0.5, "o", 576, 384),
              ("SmolLM2-135M", 0.5, "gate_up", 2068, 576), ("SmolLM2-135M", 0.5, "down", 576, 1034)]
SMOLLM2_HEAD = [("SmolLM2-135M", 0.0, "lm_head", 49152, 576)]
LLAMA_1B_HEAD = [("Llama-3.2-1B", 0.0, "lm_head", 128256, 2048)]
ROWS = (1, 8)
DTYPES = ("float32", "bfloat16")
STREAM_BYTES = 256 * 2 ** 20  # the clones of a weight total more than this
SAMPLE_BYTES = 8 * 2 ** 20  # one timing sample reads at least this much weight (when there are enough clones)
CHECK_REL = {"float32": 1e-5, "bfloat16": 4e-3}  # rel. L2 vs float64; bf16: one rounding of y is ~2^-9
PROVIDERS = ("decode_linear", "f_linear")


def clones(w: torch.Tensor, total: int) -> list[torch.Tensor]:
    """``w`` and enough clones of it that together they exceed ``total`` bytes (each its own memory)."""
    n = total // (w.numel() * w.element_size()) + 1
    return [w] + [w.clone() for _ in range(n - 1)]


def cycler(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, ws: list[torch.Tensor],
           calls: int, cursor: list[int]) -> Callable[[], None]:
    """One sample: ``fn(x, w)`` on the next ``calls`` weights of ``ws`` after the shared ``cursor``."""
    def run() -> None:
        i = cursor[0]
        for j in range(calls):
            fn(x, ws[(i + j) % len(ws)])
        cursor[0] = (i + calls) % len(ws)
    return run


def dl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.cofi.decode_linear(x, w, None)


def fl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def check(case: str, x: torch.Tensor, w: torch.Tensor, dtype: str) -> dict[str, float]:
    """Relative L2 error of each provider vs float64; refuses (SystemExit) one beyond CHECK_REL."""
    want = F.linear(x.double(), w.double())
    errs = {}
    for name, fn in (("decode_linear", dl), ("f_linear", fl)):
        got = fn(x, w).double()
        errs[name] = err = float((got - want).norm() / want.norm())
        if not err <= CHECK_REL[dtype]:
            raise SystemExit(f"bench_decode_linear: {case}: {name} is {err:.2e} from float64 (allowed "
                             f"{CHECK_REL[dtype]:g}); not timing a wrong result")
    return errs


def run_case(case: tuple, dtype: str, rows: tuple[int, ...], min_rounds: int, stream_per_provider: int,
             g: torch.Generator) -> list[dict]:
    """Every row count of one weight shape and dtype (one set of clones); a result row each."""
    model, sparsity, proj, n, k = case
    w = (torch.randn(n, k, generator=g) * 0.03).to(getattr(torch, dtype))
    nbytes = w.numel() * w.element_size()
    ws = clones(w, STREAM_BYTES)
    calls = max(1, min(len(ws) // 2, math.ceil(SAMPLE_BYTES / nbytes)))
    rounds = max(min_rounds, math.ceil(stream_per_provider / (calls * nbytes)))
    cursor = [0]
    out = []
    for m in rows:
        x = torch.randn(m, k, generator=g).to(w.dtype)
        name = f"{model} {sparsity:g} {proj} [{n}, {k}] {dtype} rows {m}"
        errs = check(name, x, w, dtype)
        fns = {"decode_linear": cycler(dl, x, ws, calls, cursor), "f_linear": cycler(fl, x, ws, calls, cursor)}
        t = H.time_interleaved(fns, rounds)
        times = {p: {key: (v / calls if key.endswith("_ms") else v) for key, v in t[p].items()} for p in PROVIDERS}
        out.append({"model": model, "sparsity": sparsity, "proj": proj, "N": n, "K": k, "rows": m, "dtype": dtype,
                    "weight_bytes": nbytes, "clones": len(ws), "calls_per_sample": calls, "rel_err": errs,
                    "times": times})
        print(f"{name:58s} | decode_linear {1e3 * times['decode_linear']['p50_ms']:8.1f} us  "
              f"F.linear {1e3 * times['f_linear']['p50_ms']:8.1f} us | "
              f"{times['f_linear']['p50_ms'] / times['decode_linear']['p50_ms']:.2f}x", flush=True)
    return out


def add_bounds(rows: list[dict], read_gb_s: float) -> None:
    """GB/s, reached (of ``read_gb_s``), bound time and decode_linear vs f_linear of every row."""
    for r in rows:
        t = {p: r["times"][p]["p50_ms"] for p in PROVIDERS}
        r["gb_s"] = {p: r["weight_bytes"] / (v / 1e3) / 1e9 for p, v in t.items()}
        r["reached"] = {p: v / read_gb_s for p, v in r["gb_s"].items()}
        r["bound_ms"] = r["weight_bytes"] / (read_gb_s * 1e9) * 1e3
        r["decode_linear_vs_f_linear"] = t["f_linear"] / t["decode_linear"]


def main() -> None:
    p = H.base_parser(__doc__.splitlines()[0], cpu_only=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    cases = SMOLLM2 + SMOLLM2_HEAD if args.quick else SMOLLM2 + SMOLLM2_50 + SMOLLM2_HEAD + LLAMA_1B_HEAD
    min_rounds, stream = (5, 2 ** 28) if args.quick else (10, 2 ** 30)
    skipped = []
    read0, copy0 = H.bandwidth(512)
    print(f"read bandwidth {read0:.1f} GB/s (copy {copy0:.1f})", flush=True)
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    with torch.inference_mode():
        for case in cases:
            for dtype in DTYPES:
                n, k = case[3], case[4]
                need = 3 * n * k * 4 + STREAM_BYTES  # float32 randn + cast + clones (at least one)
                if need > H.mem_available() // 2:
                    skipped.append(f"{case[0]} {case[2]} [{n}, {k}] {dtype}: needs ~{need / 2 ** 30:.1f} GiB, "
                                   f"less than half of MemAvailable")
                    print("skipped:", skipped[-1], flush=True)
                    continue
                rows += run_case(case, dtype, ROWS, min_rounds, stream, g)
    read1, copy1 = H.bandwidth(512)
    read_gb_s = max(read0, read1)
    add_bounds(rows, read_gb_s)
    result = {"meta": {**H.env_tags("cpu"), "quick": args.quick,
                       "command": "python " + " ".join(shlex.quote(a) for a in
                                                       ["benchmarks/bench_decode_linear.py", *sys.argv[1:]]),
                       "load_avg": [load_start, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0},
              "read_bandwidth_gb_s": read_gb_s, "read_bandwidth_runs_gb_s": [read0, read1],
              "copy_bandwidth_gb_s": max(copy0, copy1), "stream_bytes": STREAM_BYTES, "skipped": skipped,
              "rows": rows}
    path = H.write_result("decode_linear_quick" if args.quick else "decode_linear", result, "cpu", args.out,
                          indent=1, newline=True)
    print(f"read bandwidth {read0:.1f} / {read1:.1f} GB/s (start / end); total {result['meta']['wall_s']:.0f} s; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
