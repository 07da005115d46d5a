"""masked_attention: cofi native (and Triton on GPU) vs the eager masked reference vs SDPA on all heads.

Shapes (BERT-base heads): B=32,S=128 and B=1,S=512, H=12, D=64; live-head fractions 1.0, 0.5, 0.1
(dead heads have gate exactly 0). Providers: `reference` (eager masked reference, all heads),
`sdpa` (torch.nn.functional.scaled_dot_product_attention on all heads, then gated: what a dense
model pays whatever the pruning), `native` (forced native backend), `triton` (GPU only). Modes fwd
and fwd_bwd (backward of sum(out * g) into q, k, v and head_z). Ratios are within one run.
FLOP/s counts the live heads only: 4 B H_live S^2 D (fwd), x3.5 for fwd_bwd (recompute + 5 matmuls).

    python benchmarks/bench_masked_attention.py [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _harness as H
from cofi import ops
from cofi.ops.masked_attention import masked_attention
from cofi.ops.reference.masked_attention import masked_attention_ref

CONFIGS = {"bert-base-b32-s128": (32, 12, 128, 64), "bert-base-b1-s512": (1, 12, 512, 64)}
FRACTIONS = (1.0, 0.5, 0.1)


def make(Bsz, Hh, S, D, frac, device, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(Bsz, Hh, S, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    z = torch.rand(Hh, generator=g) * 0.5 + 0.5
    n_live = max(1, round(frac * Hh))
    z[n_live:] = 0.0
    z = z.to(device, dtype).requires_grad_()
    go = torch.randn(Bsz, Hh, S, D, generator=g).to(device, dtype)
    return q, k, v, z, go, n_live


def providers(device):
    p = {
        "reference": lambda q, k, v, z: masked_attention_ref(q, k, v, z),
        "sdpa": lambda q, k, v, z: F.scaled_dot_product_attention(q, k, v) * z[None, :, None, None],
        "native": lambda q, k, v, z: masked_attention(q, k, v, z, backend="native"),
    }
    if device.startswith("cuda"):
        p["triton"] = lambda q, k, v, z: masked_attention(q, k, v, z, backend="triton")
    return p


def main() -> None:
    ap = H.base_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    dtype = torch.float32
    configs = dict(list(CONFIGS.items())[1:]) if args.quick else CONFIGS
    fracs = (1.0, 0.1) if args.quick else FRACTIONS
    mrt = args.min_run_time or (0.3 if args.quick else 1.0)
    rows = []
    for cname, (Bsz, Hh, S, D) in configs.items():
        for frac in fracs:
            q, k, v, z, go, n_live = make(Bsz, Hh, S, D, frac, dev, dtype)
            want = masked_attention_ref(q, k, v, z)
            want_g = torch.autograd.grad(want, (q, k, v, z), go)
            base = {}
            for prov, fn in providers(dev).items():
                got = fn(q, k, v, z)
                got_g = torch.autograd.grad(got, (q, k, v, z), go)
                backend_ran = ops.last_backend("masked_attention") if prov in ("native", "triton") else prov
                # sdpa computes dead heads too, so its d head_z there is the dense one: compare the rest
                n_cmp = 4 if prov == "sdpa" else 5
                err = H.check_close(prov, (got, *got_g)[:n_cmp], (want.detach(), *want_g)[:n_cmp], 1e-3, 1e-3)
                for mode in ("fwd", "fwd_bwd"):
                    if err:
                        print("WRONG", cname, frac, err)
                        rows.append({"op": "masked_attention", "provider": prov, "mode": mode, "error": err})
                        continue

                    def run(fn=fn, mode=mode):
                        if mode == "fwd":
                            with torch.no_grad():
                                return fn(q, k, v, z)
                        out = fn(q, k, v, z)
                        return torch.autograd.grad(out, (q, k, v, z), go)

                    t = H.measure(run, mrt, dev)
                    base.setdefault(("reference", mode), None)
                    base[(prov, mode)] = t["p50_ms"]
                    flops = 4 * Bsz * n_live * S * S * D * (3.5 if mode == "fwd_bwd" else 1.0)
                    rows.append({
                        "op": "masked_attention", "provider": prov, "backend_ran": backend_ran, "mode": mode,
                        "shape": {"config": cname, "B": Bsz, "H": Hh, "S": S, "D": D, "live_frac": frac,
                                  "live_heads": n_live},
                        "dtype": str(dtype).replace("torch.", ""), **t,
                        "gflops_live": round(flops / (t["p50_ms"] * 1e-3) / 1e9, 2), **H.env_tags(dev)})
            for r in rows:
                if r.get("shape", {}).get("config") == cname and r["shape"]["live_frac"] == frac and "p50_ms" in r:
                    ref, sd = base.get(("reference", r["mode"])), base.get(("sdpa", r["mode"]))
                    r["speedup_vs_reference"] = round(ref / r["p50_ms"], 2) if ref else None
                    r["speedup_vs_sdpa"] = round(sd / r["p50_ms"], 2) if sd else None
    ok = [r for r in rows if "p50_ms" in r]
    H.print_table([{**r, "config": r["shape"]["config"], "live": r["shape"]["live_frac"],
                    "p50_ms": round(r["p50_ms"], 2)} for r in ok],
                  ["config", "live", "mode", "provider", "backend_ran", "p50_ms", "speedup_vs_reference",
                   "speedup_vs_sdpa", "gflops_live"])
    print("wrote", H.write_rows("masked_attention", rows, dev, args.out))


if __name__ == "__main__":
    main()
