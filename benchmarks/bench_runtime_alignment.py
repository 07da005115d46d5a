"""Does the 60 % compact model lose speed to odd GEMM sizes? (issue 8, an experiment)

The 60 % CoFi-like structure of bench_runtime.py keeps 767 of 768 hidden dims, so every GEMM of the
compact model has K (or N) = 767, and its FFN widths are not multiples of 64. This times, interleaved
in one process (BERT-base, batch 32 x 128, fp32, 2 threads), the dense HF model and four compact
variants: hidden 767 (the real structure) or 768 (the same masks with the hidden mask all ones), each
with or without FFN widths zero-padded to multiples of 64 (``CompactModel.pad_ffn_``, exact).

    PYTHONPATH=python:. python benchmarks/bench_runtime_alignment.py [--rounds 5]

Writes results/cpu/runtime_alignment.json. The 768 variants are a different (slightly larger)
model: they bound what padding the hidden size (a zero dim left out of LayerNorm statistics) could
gain; the runtime does not do that yet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_runtime as R  # noqa: E402

from cofi.pruning import prune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--quick", action="store_true", help="one round, results not written (make bench)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    import transformers as tf

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = tf.BertConfig(num_labels=3, attn_implementation="sdpa")
    dense = tf.BertForSequenceClassification(cfg).eval()
    masks, c767 = R.masks_for_sparsity(dense, args.sparsity)
    full_hidden = dict(masks, hidden=torch.ones_like(masks["hidden"]))
    models = {"compact_767": c767, "compact_768": prune(dense, full_hidden),
              "compact_767_ffnpad64": prune(dense, masks).pad_ffn_(64),
              "compact_768_ffnpad64": prune(dense, full_hidden).pad_ffn_(64)}
    B, S = 32, 128
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(1000, cfg.vocab_size, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[B // 2:, 96:] = 0
    tt = torch.zeros_like(ids)
    fns = {"dense": lambda: dense(input_ids=ids, attention_mask=am, token_type_ids=tt)}
    fns.update({k: (lambda m=m: m(ids, am, tt)) for k, m in models.items()})
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"sparsity": args.sparsity, "batch": B, "seq": S, "rounds": args.rounds,
           "hidden_sizes": {k: m.config.hidden_size for k, m in models.items()},
           "ffn_widths": {k: list(m.config.intermediate_sizes) for k, m in models.items()},
           "median_ms": {k: v * 1e3 for k, v in med.items()},
           "speedup_vs_dense": {k: med["dense"] / v for k, v in med.items() if k != "dense"},
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    for k, v in med.items():
        print(f"{k:22s} {v * 1e3:8.1f} ms  speedup {med['dense'] / v:.2f}x")
    if args.quick:
        print(json.dumps(res, indent=2))
        return
    out = Path(__file__).parent / "results" / "cpu" / "runtime_alignment.json"
    out.write_text(json.dumps(res, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
