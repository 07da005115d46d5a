"""Does the 60 % compact model lose speed to odd GEMM sizes? (issue 8, an experiment)

The 60 % CoFi-like structure of bench_runtime.py keeps 767 of 768 hidden dims, so every GEMM of the
compact model has K (or N) = 767, and its FFN widths are not multiples of 64. This times, interleaved
in one process (BERT-base, batch 32 x 128, fp32, 2 threads), the dense HF model and four compact
variants: hidden 767 (the real structure) or 768 (the same masks with the hidden mask all ones), each
with or without FFN widths zero-padded to multiples of 64 (``CompactModel.pad_ffn_``, exact).

    PYTHONPATH=python:. python benchmarks/bench_runtime_alignment.py [--rounds 5]

Timed with ``_harness.time_interleaved`` (one warm-up round, then one call of each model per round).
Writes results/cpu/runtime_alignment.json (with ``_harness.env_tags``). The 768 variants are a different (slightly larger)
model: they bound what padding the hidden size (a zero dim left out of LayerNorm statistics) could
gain; the runtime does not do that yet.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402
import bench_runtime as R  # noqa: E402

from cofi.pruning import prune  # noqa: E402


def main() -> None:
    ap = H.base_parser(__doc__.splitlines()[0], cpu_only=True)  # --quick: one round, results not written (make bench)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sparsity", type=float, default=0.6)
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    import transformers as tf

    torch.set_num_threads(args.threads)
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
    with torch.inference_mode():
        t = H.time_interleaved(fns, args.rounds, warmup=1)
    med = {k: v["p50_ms"] for k, v in t.items()}  # median ms over the rounds
    res = {"sparsity": args.sparsity, "batch": B, "seq": S, "rounds": args.rounds,
           "hidden_sizes": {k: m.config.hidden_size for k, m in models.items()},
           "ffn_widths": {k: list(m.config.intermediate_sizes) for k, m in models.items()},
           "median_ms": med,
           "speedup_vs_dense": {k: med["dense"] / v for k, v in med.items() if k != "dense"},
           "torch": torch.__version__, "threads": torch.get_num_threads(), "env": H.env_tags("cpu")}
    for k, v in med.items():
        print(f"{k:22s} {v:8.1f} ms  speedup {med['dense'] / v:.2f}x")
    if args.quick:
        print(json.dumps(res, indent=2))
        return
    print("wrote", H.write_result("runtime_alignment", res, "cpu", args.out, indent=2))


if __name__ == "__main__":
    main()
