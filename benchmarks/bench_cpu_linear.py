"""Few-row CPU GEMMs: column split (csrc/cpu_linear.h) vs BLAS's own threading, through masked_ffn.

The native masked_ffn forward kernel (no masks) runs its two GEMMs with ``cofi::cpu::linear``: up to
256 rows, each thread computes its own block of output columns with a single-threaded BLAS call;
``COFI_GEMM_SPLIT=0`` (read per call) makes the same op use plain ``at::addmm`` / ``at::mm``, i.e.
BLAS's threading. Providers, timed interleaved in one process (one call each per round, median):

- split:   ``cofi::masked_ffn_fwd_native``, column split on (the default);
- blas:    the same kernel with COFI_GEMM_SPLIT=0 (same epilogue, only the GEMM threading differs);
- eager:   F.linear -> F.gelu -> F.linear (what an eager model runs).

Shapes: BERT-base FFN (768 -> 3072 -> 768), FFN widths of the 60 % / 95 %-sparse structures of
bench_runtime.py after ``pad_(16)`` (1056 over 768 hidden dims, 752 over 736) and one unpadded width
(739: MKL is slow at N not a multiple of 16, in both modes). Rows = batch x 128 tokens; at 512 and
2048 rows (above the threshold, set from this benchmark) split and blas run the same code: those
rows' ratios are the noise floor of the run. fp32, no gradient.

    python benchmarks/bench_cpu_linear.py [--quick] [--threads 2]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

from cofi.ops.masked_ffn import ACT_CODES  # noqa: E402

SHAPES = [(768, 3072), (768, 1056), (736, 752), (736, 739)]  # (hidden d, FFN width F)
ROWS = (16, 64, 128, 256, 512, 2048)  # 512, 2048: above the threshold (same code in split and blas)


def eager_ffn(x, w1, b1, w2, b2) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def split_ffn(x, w1, b1, w2, b2, on: bool) -> torch.Tensor:
    """The native forward kernel called directly (what the compact runtime's fused encoder calls;
    the public op adds ~0.1-0.2 ms of Python custom-op dispatch, which would blur small shapes)."""
    with H.env_var("COFI_GEMM_SPLIT", "1" if on else "0"):
        return torch.ops.cofi.masked_ffn_fwd_native(x, w1, b1, w2, b2, None, None, None, ACT_CODES["gelu"])[0]


def main() -> None:
    parser = H.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_list = (16, 128, 2048) if args.quick else ROWS
    rows_out = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for d, f in SHAPES:
            w1, b1 = torch.randn(f, d, generator=g) * 0.03, torch.randn(f, generator=g) * 0.1
            w2, b2 = torch.randn(d, f, generator=g) * 0.03, torch.randn(d, generator=g) * 0.1
            for n in rows_list:
                x = torch.randn(n, d, generator=g)
                want = eager_ffn(x, w1, b1, w2, b2)
                for on in (True, False):
                    err = H.check_close("split" if on else "blas", split_ffn(x, w1, b1, w2, b2, on), want, 1e-4, 1e-4)
                    assert err is None, err
                fns = {"split": lambda: split_ffn(x, w1, b1, w2, b2, True),
                       "blas": lambda: split_ffn(x, w1, b1, w2, b2, False),
                       "eager": lambda: eager_ffn(x, w1, b1, w2, b2)}
                rounds = args.rounds or max(5, min(200, (40 if args.quick else 80) * 128 // n))
                t = H.time_interleaved(fns, rounds)
                gflop = 4 * n * d * f / 1e9
                row = {"d": d, "F": f, "rows": n, "times": t,
                       "gflops": {k: gflop / (v["p50_ms"] / 1e3) for k, v in t.items()},
                       "split_vs_blas": t["blas"]["p50_ms"] / t["split"]["p50_ms"],
                       "split_vs_eager": t["eager"]["p50_ms"] / t["split"]["p50_ms"]}
                rows_out.append(row)
                print(f"d {d:4d} F {f:4d} rows {n:5d} | split {t['split']['p50_ms']:8.3f} ms "
                      f"({row['gflops']['split']:5.1f} GF/s)  blas {t['blas']['p50_ms']:8.3f} "
                      f"({row['gflops']['blas']:5.1f})  eager {t['eager']['p50_ms']:8.3f} | split vs blas "
                      f"{row['split_vs_blas']:.2f}x  vs eager {row['split_vs_eager']:.2f}x", flush=True)
    out = H.write_result("cpu_linear", {"bench": "cpu_linear", "env": H.env_tags("cpu"), "quick": args.quick,
                                        "rows": rows_out}, "cpu", args.out, indent=1, newline=True)
    print("wrote", out)


if __name__ == "__main__":
    main()
