"""masked_layer_norm on BERT-base rows: fused native vs the eager masked reference vs nn.LayerNorm.

x, residual [tokens, 768]; hidden_z with 0 / 10 / 50 % exact zeros (and None: the runtime's plain
LayerNorm + residual). Modes fwd (no_grad) and fwd_bwd (every input requires grad). Providers:
`dense` (F.layer_norm(x + residual): the unmasked cost), `reference` (masked_layer_norm_ref),
`native`, `triton` (GPU only). GB/s counts x, residual and y once (fwd) plus grads (fwd_bwd).

    python benchmarks/bench_masked_layer_norm.py [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _harness as H
from cofi import ops
from cofi.ops.reference import masked_layer_norm_ref

D, TOKENS, QUICK_TOKENS = 768, 4096, 1024
PRUNED = (None, 0.0, 0.1, 0.5)


def make(n, d, pruned, dev):
    g = torch.Generator().manual_seed(0)
    x, r, w, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(d, generator=g), torch.randn(d, generator=g)
    z = None
    if pruned is not None:
        z = torch.rand(d, generator=g) * 0.5 + 0.5
        z[torch.randperm(d, generator=g)[: int(pruned * d)]] = 0
    return [t.to(dev).requires_grad_() if t is not None else None for t in (x, r, w, b, z)]


def providers(dev):
    p = {"dense": lambda x, r, w, b, z: F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-12),
         "reference": masked_layer_norm_ref,
         "native": lambda *a: ops.masked_layer_norm(*a, backend="native")}
    if dev.startswith("cuda"):
        p["triton"] = lambda *a: ops.masked_layer_norm(*a, backend="triton")
    return p


def main() -> None:
    args = H.base_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    n = QUICK_TOKENS if args.quick else TOKENS
    rows = []
    for pruned in PRUNED:
        ins = make(n, D, pruned, dev)
        req = [t for t in ins if t is not None]
        want = masked_layer_norm_ref(*ins)
        want_g = torch.autograd.grad(want.sum(), req)
        for mode in ("fwd", "fwd_bwd"):
            base = None
            for prov, fn in providers(dev).items():
                if prov != "dense":
                    got = fn(*ins)
                    err = H.check_close(prov, (got, *torch.autograd.grad(got.sum(), req)), (want, *want_g), 1e-3, 1e-3)
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
                ran = ops.last_backend("masked_layer_norm") if prov in ("native", "triton") else "eager"
                base = t["p50_ms"] if prov == "reference" else base
                nbytes = 4 * n * D * (3 if mode == "fwd" else 7)
                rows.append({"op": "masked_layer_norm", "provider": prov, "backend_ran": ran, "mode": mode,
                             "shape": {"tokens": n, "d": D, "pruned_fraction": pruned}, "dtype": "float32", **t,
                             "gb_per_s": round(nbytes / t["p50_ms"] / 1e6, 2), **H.env_tags(dev)})
            for r in rows:
                if r["mode"] == mode and r["shape"]["pruned_fraction"] == pruned and base:
                    r["speedup_vs_reference"] = round(base / r["p50_ms"], 2)
    H.print_table([{**r, "pruned": r["shape"]["pruned_fraction"]} for r in rows],
                  ["pruned", "mode", "provider", "backend_ran", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_reference"])
    print("wrote", H.write_rows("masked_layer_norm", rows, dev, args.out))


if __name__ == "__main__":
    main()
