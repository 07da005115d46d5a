"""One training step's mask work for a BERT-base mask set: fused cofi ops vs the eager reference.

Per step CoFi samples every mask (hidden 768, heads 12x12, MHA 12, intermediate 12x3072, FFN 12),
computes keep probabilities and the expected size/sparsity, and back-propagates the Lagrangian and
the task loss into log_alpha. Providers: `reference` (the eager formulas, as the CoFi code does
them, one tensor per group), `reference_compiled` (same under torch.compile), `native` (the fused
cofi.ops.hard_concrete_step, forced native: one op forward, one backward), `native_unfused` (sample,
keep-prob and expected_size as three cofi ops) and `triton` (GPU only). Mode fwd_bwd.

    python benchmarks/bench_hard_concrete.py [--quick]
"""
from __future__ import annotations

import torch

import _harness as H
from cofi import ops
from cofi.ops.reference import expected_size_ref, hard_concrete_keep_prob_ref, hard_concrete_sample_ref
from cofi.vocab import GROUPS, group_shapes

CONFIGS = {"bert-base": (12, 768, 12, 3072), "minilm-l6": (6, 384, 12, 1536)}


def make_groups(L, d, Hh, F, device, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = group_shapes(L, d, Hh, F)  # in GROUPS order: the flat layout of MaskSet / hard_concrete_step
    flat = torch.cat([torch.randn(*s, generator=g).reshape(-1) * 2 + 1 for s in shapes.values()]).to(device, dtype)
    return flat.requires_grad_(), shapes


def split(x, shapes):
    out, i = {}, 0
    for k, s in shapes.items():
        n = torch.Size(s).numel()
        out[k] = x[i:i + n].view(s)
        i += n
    return out


def reference_step(flat, u, shapes, cfg, target):
    # the reference's way: one sample + one CDF per group, expected size from the groups
    la = split(flat, shapes)
    us = split(u, shapes)
    zs = {k: hard_concrete_sample_ref(la[k], us[k]) for k in la}
    ps = {k: hard_concrete_keep_prob_ref(la[k]) for k in la}
    _, s = expected_size_ref(*(ps[g] for g in GROUPS), *cfg)
    loss = 0.5 * (s - target) + 0.1 * (s - target) ** 2 + sum(z.sum() * 1e-4 for z in zs.values())
    loss.backward()
    return loss


def fused_step(flat, u, shapes, cfg, target, backend="native"):
    # everything in one op each way: cofi.ops.hard_concrete_step
    L, d, Hh, F = cfg
    offsets, i = {}, 0
    for k, s in shapes.items():
        offsets[k] = i
        i += torch.Size(s).numel()
    r = ops.hard_concrete_step(flat, offsets, num_layers=L, hidden_size=d, num_heads=Hh, intermediate_size=F,
                               noise=u, backend=backend)
    s = r.expected_sparsity
    loss = 0.5 * (s - target) + 0.1 * (s - target) ** 2 + r.z.sum() * 1e-4
    loss.backward()
    return loss


def unfused_step(flat, u, shapes, cfg, target, backend="native"):
    z = ops.hard_concrete_sample(flat, noise=u, backend=backend)  # one launch for every group
    p = split(ops.hard_concrete_keep_prob(flat, backend=backend), shapes)
    L, d, Hh, F = cfg
    _, s = ops.expected_size(num_layers=L, hidden_size=d, num_heads=Hh, intermediate_size=F, backend=backend, **p)
    loss = 0.5 * (s - target) + 0.1 * (s - target) ** 2 + z.sum() * 1e-4
    loss.backward()
    return loss


def main() -> None:
    args = H.base_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    providers = {"reference": reference_step, "native": fused_step, "native_unfused": unfused_step}
    if dev == "cuda":
        providers["triton"] = lambda *a: fused_step(*a, backend="triton")
    if not args.quick:
        providers["reference_compiled"] = torch.compile(reference_step)
    rows = []
    for name, cfg in CONFIGS.items():
        if args.quick and name != "bert-base":
            continue
        flat, shapes = make_groups(*cfg, dev, torch.float32)
        u = torch.rand(flat.shape, device=dev) * 0.998 + 0.001
        want_loss = reference_step(flat, u, shapes, cfg, 0.5)
        want_grad = flat.grad.clone()
        base = None
        for prov, fn in providers.items():
            flat.grad = None
            got = fn(flat, u, shapes, cfg, 0.5)
            err = H.check_close(prov, (got, flat.grad), (want_loss, want_grad), 1e-4, 1e-4)
            if err:
                print("WRONG, not timed:", err)
                continue

            def run():
                flat.grad = None
                fn(flat, u, shapes, cfg, 0.5)

            t = H.measure(run, args.min_run_time or (0.3 if args.quick else 1.0), dev)
            op_ran = "hard_concrete_sample" if prov == "native_unfused" else "hard_concrete_step"
            backend_ran = "reference" if prov.startswith("reference") else ops.last_backend(op_ran)
            base = t["p50_ms"] if prov == "reference" else base
            rows.append({"op": "hard_concrete", "provider": prov, "backend_ran": backend_ran, "mode": "fwd_bwd",
                         "shape": {"config": name, "mask_elements": flat.numel()}, "dtype": "float32", **t,
                         "speedup_vs_reference": round(base / t["p50_ms"], 2) if base else None, **H.env_tags(dev)})
    H.print_table([{**r, "config": r["shape"]["config"]} for r in rows],
                  ["config", "provider", "backend_ran", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_reference"])
    print("wrote", H.write_rows("hard_concrete", rows, dev, args.out))


if __name__ == "__main__":
    main()
