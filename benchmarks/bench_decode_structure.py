"""Where a decode step's time goes beyond its bytes: a whole step vs one stream of the same bytes.

bench_generate holds each decode step against the read bandwidth. This benchmark splits the gap:
per case (a model, dtype and sparsity; batch 1, ~128 cached tokens) three things are timed
interleaved in one process, one sample of each per round, median over rounds:

- step:     one decoding step of cofi's runtime (``LlamaRuntime``; ``cofi::llama_decode_step``: every
            layer, the final norm and the LM head in one native call);
- one_gemv: one ``cofi::decode_linear`` over a single weight [bytes / (576 x element size), 576] of the
            dtype, about as many bytes as the step reads (the projection kernel with none of the step's
            structure: no dependent projections, barriers or per-row work between them);
- sum:      ``torch.sum`` over a float32 buffer of the same bytes (the read-bandwidth reference).

sum / step = the step's fraction of the read bandwidth; sum / one_gemv = the kernel's; one_gemv /
step = what the step's structure keeps (SmolLM2: 30 layers, ~120 dependent projections of 0.1-1.5
MB a token). Cases: SmolLM2-135M (tools/setup_smollm2.py) fp32 and bf16 at 50 and 70 % (uniform
random masks, as bench_generate); --quick: a small random config (shows the harness works).

    python benchmarks/bench_decode_structure.py [--quick] [--threads 2]

Writes results/cpu/decode_structure.json (--quick: decode_structure_quick.json).
"""
from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H
import bench_generate as G
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.llama_runtime import LlamaRuntime

PROMPT, CACHED = 64, 128  # prompt tokens; the timed steps run from here to CACHED
STEPS = 32  # steps per sample (the cache is rewound between samples)


def build(quick: bool, dtype: torch.dtype, sparsity: float) -> LlamaRuntime:
    if quick or not G.SMOLLM2.exists():
        from cofi.models.llama import CoFiLlamaForCausalLM
        from transformers import LlamaConfig

        torch.manual_seed(0)
        dense = CoFiLlamaForCausalLM(LlamaConfig(**G.SHAPES["quick"])).eval().to(dtype)
    else:
        from cofi.models.llama import CoFiLlamaForCausalLM

        dense = CoFiLlamaForCausalLM.from_pretrained(G.SMOLLM2, dtype=dtype).eval()
    return LlamaRuntime(fold_llama(dense, G.uniform_masks(dense.shape, sparsity)))


def run_case(rt: LlamaRuntime, rounds: int) -> dict:
    """Median ms of a step, of one decode_linear over the step's bytes, of torch.sum over them."""
    nbytes = G.step_read_bytes(rt, 1, CACHED)
    K, es = 576, rt.embed.element_size()
    big = torch.randn(nbytes // (K * es), K).to(rt.dtype)
    x = torch.randn(1, K).to(rt.dtype)
    buf = torch.ones(nbytes // 4)
    prompt = torch.randint(3, rt.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    tok = torch.tensor([[5]])
    ms: dict[str, list[float]] = {"step": [], "one_gemv": [], "sum": []}
    with torch.inference_mode():
        cache = rt.new_cache(1, PROMPT + STEPS + 2)
        rt(prompt, cache=cache, last_only=True)
        for r in range(rounds + 1):  # round 0 warms up
            cache.length, cache.next_pos[:] = PROMPT, PROMPT
            t0 = time.perf_counter()
            for _ in range(STEPS):
                rt(tok, cache=cache)
            t1 = time.perf_counter()
            for _ in range(4):
                torch.ops.cofi.decode_linear(x, big, None)
            t2 = time.perf_counter()
            for _ in range(4):
                buf.sum()
            t3 = time.perf_counter()
            if r:
                ms["step"].append((t1 - t0) / STEPS * 1e3)
                ms["one_gemv"].append((t2 - t1) / 4 * 1e3)
                ms["sum"].append((t3 - t2) / 4 * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    return {"bytes": nbytes, **{f"{k}_ms": v for k, v in med.items()},
            **{f"{k}_gb_s": nbytes / v / 1e6 for k, v in med.items()},
            "step_of_sum": med["sum"] / med["step"], "gemv_of_sum": med["sum"] / med["one_gemv"],
            "step_of_gemv": med["one_gemv"] / med["step"], "rounds": rounds}


def main() -> None:
    p = H.base_parser(__doc__.splitlines()[0], cpu_only=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    source = "quick (random)" if args.quick or not G.SMOLLM2.exists() else "SmolLM2-135M-Instruct (Q4_1-dequantized)"
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for sparsity in (0.5, 0.7):
            row = {"dtype": str(dtype).removeprefix("torch."), "sparsity": sparsity,
                   **run_case(build(args.quick, dtype, sparsity), 3 if args.quick else 8)}
            rows.append(row)
            print(f"{row['dtype']} {sparsity:g}: step {row['step_ms']:.2f} ms ({row['step_gb_s']:.1f} GB/s), "
                  f"one decode_linear of its {row['bytes'] / 1e6:.0f} MB {row['one_gemv_ms']:.2f} ms "
                  f"({row['one_gemv_gb_s']:.1f}), torch.sum {row['sum_ms']:.2f} ms ({row['sum_gb_s']:.1f}); "
                  f"step / sum {row['step_of_sum']:.2f}, gemv / sum {row['gemv_of_sum']:.2f}", flush=True)
    result = {"meta": {**H.env_tags("cpu"), "quick": args.quick, "source": source,
                       "command": "python " + " ".join(shlex.quote(a) for a in
                                                       ["benchmarks/bench_decode_structure.py", *sys.argv[1:]]),
                       "load_avg": [load_start, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0},
              "rows": rows}
    path = H.write_result("decode_structure_quick" if args.quick else "decode_structure", result, "cpu", args.out,
                          indent=1, newline=True)
    print(f"total {result['meta']['wall_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
