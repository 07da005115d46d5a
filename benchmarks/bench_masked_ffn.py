"""masked_ffn on BERT-base FFN sizes: native vs the eager masked reference vs a dense FFN.

Live-unit fractions 1.0, 0.5, 0.1, 0.02 of int_z (dead units exactly 0, mlp_z = 1); modes fwd
(no_grad) and fwd_bwd (every weight and both masks require grad, as in CoFi training).
Providers: `dense` (nn.Linear + GELU + nn.Linear, no masks: the unpruned cost), `reference`
(cofi.ops.reference.masked_ffn_ref: dense GEMMs then multiply, as the CoFi code does),
`native` (cofi.ops.masked_ffn, forced native), `triton` (GPU only). FLOP/s count the live units.

    python benchmarks/bench_masked_ffn.py [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _harness as H
from cofi import ops
from cofi.ops.reference import masked_ffn_ref

CONFIGS = {"bert-base": (768, 3072)}
TOKENS, QUICK_TOKENS = 4096, 512
FRACTIONS = (1.0, 0.5, 0.1, 0.02)


def make(n, d, f, frac, dev, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ts = [r(n, d), r(f, d) * 0.03, r(f) * 0.1, r(d, f) * 0.03, r(d) * 0.1]
    z = torch.rand(f, generator=g) * 0.5 + 0.5
    z[torch.randperm(f, generator=g)[: f - int(round(frac * f))]] = 0
    return [t.to(dev, dtype).requires_grad_() for t in ts + [z, torch.tensor(1.0)]]


def dense(x, w1, b1, w2, b2, z, m):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def providers(dev):
    p = {"dense": dense, "reference": masked_ffn_ref,
         "native": lambda *a: ops.masked_ffn(*a, backend="native")}
    if dev.startswith("cuda"):
        p["triton"] = lambda *a: ops.masked_ffn(*a, backend="triton")
    return p


def main() -> None:
    parser = H.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="live-unit fractions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    n = QUICK_TOKENS if args.quick else TOKENS
    rows = []
    for cfg, (d, f) in CONFIGS.items():
        for frac in args.fractions:
            ins = make(n, d, f, frac, dev)
            live = int((ins[5] != 0).sum())
            want = masked_ffn_ref(*ins)
            want_g = torch.autograd.grad(want.sum(), ins)
            for mode in ("fwd", "fwd_bwd"):
                base = None
                for prov, fn in providers(dev).items():
                    if prov != "dense":
                        got = fn(*ins)
                        got_g = torch.autograd.grad(got.sum(), ins)
                        err = H.check_close(prov, (got, *got_g), (want, *want_g), 2e-3, 2e-3)
                        if err:
                            print("WRONG, not timed:", err)
                            continue

                    def run(fn=fn):
                        if mode == "fwd":
                            with torch.no_grad():
                                fn(*ins)
                        else:
                            fn(*ins).sum().backward()

                    t = H.measure(run, args.min_run_time or (0.2 if args.quick else 1.0), dev)
                    ran = ops.last_backend("masked_ffn") if prov in ("native", "triton") else "eager"
                    base = t["p50_ms"] if prov == "reference" else base
                    flops = 2 * n * d * live * 2 * (3 if mode == "fwd_bwd" else 1)
                    rows.append({"op": "masked_ffn", "provider": prov, "backend_ran": ran, "mode": mode,
                                 "shape": {"config": cfg, "tokens": n, "d": d, "F": f, "live_fraction": frac},
                                 "dtype": "float32", **t, "live_gflops": round(flops / t["p50_ms"] / 1e6, 1),
                                 **H.env_tags(dev)})
                for r in rows:
                    if r["mode"] == mode and r["shape"]["live_fraction"] == frac and r["shape"]["config"] == cfg:
                        dense_ms = next(x["p50_ms"] for x in rows if x["mode"] == mode and x["provider"] == "dense"
                                        and x["shape"]["live_fraction"] == frac)
                        r["speedup_vs_reference"] = round(base / r["p50_ms"], 2) if base else None
                        r["time_vs_dense"] = round(r["p50_ms"] / dense_ms, 3)
    H.print_table([{**r, "frac": r["shape"]["live_fraction"]} for r in rows],
                  ["frac", "mode", "provider", "backend_ran", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_reference",
                   "time_vs_dense"])
    print("wrote", H.write_rows("masked_ffn", rows, dev, args.out))


if __name__ == "__main__":
    main()
