"""Pruned-decoder generation speed (issue 22, "Show"): prefill latency, decode tokens/s and peak
memory, all providers timed interleaved in one process (ratios only from one run).

Providers per sparsity (random masks with a uniform shape: every layer keeps the same query heads per
K/V group and the same SwiGLU units, so the fold is a stock LlamaForCausalLM; the FFN width is solved
so the body hits the target sparsity; hidden size kept):
- rt_pruned:  cofi's runtime (``cofi.runtime.llama_runtime``) on the pruned compact model;
- rt_dense:   the same runtime on the dense model (a fold with no masks);
- hf_dense:   transformers on the dense model (prefill: forward with ``logits_to_keep=1``; decode:
              ``generate``, greedy, SDPA attention);
- hf_pruned:  transformers on the exported stock pruned checkpoint (``export_llama``), same calls.

Prefill: S-token prompts, batch 1 and 8, next-token logits only. Decode: tokens/s over N new tokens
after a P-token prompt, from (t(N) - t(1)) / (N - 1) per step (prefill and setup cancel out).
Memory: weights + KV cache bytes at the end of decoding (counted), and the process's peak RSS
growth over one decode call (sampled every ms from /proc/self/statm; CPU only).
Bounds: prefill FLOP ratio dense / pruned (matmuls incl. attention, one LM-head row per sequence);
decode: bytes read per step (all weights incl. the LM head, plus the KV cache at mid-decode) over the
read bandwidth measured in the same run (sum of a large buffer), as tokens/s; efficiency = measured /
bound. --quick: a small random config, short sequences (numbers show the harness works, not speed).
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import base_parser, env_tags, time_interleaved, write_result
from cofi.masks.decoder import DecoderMasks, DecoderShape
from cofi.models.llama import CoFiLlamaForCausalLM
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.generate import SamplingConfig, generate
from cofi.runtime.llama_export import export_llama
from cofi.runtime.llama_runtime import LlamaRuntime

SMOLLM2 = Path(os.environ.get("COFI_CACHE", Path.home() / ".cache" / "cofi")) / "smollm2-135m-instruct-q4_1"
SHAPES = {  # random-weight configs
    "quick": {"vocab_size": 4096, "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "smollm2": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}},
}


def uniform_masks(s: DecoderShape, sparsity: float, seed: int = 0) -> DecoderMasks:
    """Keep round(n (1 - sparsity)) query heads per group (>= 1) in every layer and solve the SwiGLU
    width so that the body's matmul parameters are (1 - sparsity) of the dense ones."""
    g = torch.Generator().manual_seed(seed)
    m = DecoderMasks.ones(s, torch.float32)
    n, G, D, d = s.group_size, s.num_kv_heads, s.head_dim, s.hidden_size
    h = max(1, round(n * (1 - sparsity)))

    def attn(q: int) -> int:
        return 2 * d * (q + G) * D

    target = (1 - sparsity) * (attn(s.num_heads) + 3 * d * s.intermediate_size)
    f = int(min(s.intermediate_size, max(1, round((target - attn(G * h)) / (3 * d)))))
    for layer in range(s.num_layers):
        for grp in range(G):
            m.head[layer, torch.randperm(n, generator=g)[: n - h] + grp * n] = 0.0
        m.intermediate[layer, torch.randperm(s.intermediate_size, generator=g)[: s.intermediate_size - f]] = 0.0
    return m


def matmul_flops(rt: LlamaRuntime, batch: int, seq: int) -> float:
    """Prefill FLOPs: 2 x weights x tokens for every projection, QK^T and PV (causal: half), one LM-head row."""
    D, fl = rt.head_dim, 0.0
    for layer in rt.layers:
        if layer.attn:
            fl += 2 * batch * seq * (layer.qkv_w.numel() + layer.o_w.numel())
            fl += 2 * 2 * batch * layer.nq * D * seq * seq / 2
        if layer.mlp:
            fl += 2 * batch * seq * (layer.gu_w.numel() + layer.down_w.numel())
    return fl + 2 * batch * rt.lm_head.numel()


def weight_bytes(rt: LlamaRuntime) -> int:
    seen, n = set(), 0
    for t in rt.buffers():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def kv_bytes(rt: LlamaRuntime, batch: int, length: int) -> int:
    return sum(2 * batch * layer.nk * length * rt.head_dim * rt.embed.element_size() for layer in rt.layers
               if layer.attn)


def read_bandwidth(mb: int) -> float:
    """GB/s of torch.sum over an ``mb`` MiB float32 buffer (best of 5)."""
    x = torch.ones(mb * 2 ** 18)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def peak_rss_growth(fn) -> int:
    """Bytes the resident set grew above its start during ``fn()`` (sampled every ms)."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    start, peak, stop = rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        stop.set()
        t.join()
    return max(0, max(peak[0], rss()) - start)


def build(args, dtype: torch.dtype):
    import transformers as T

    if args.config == "smollm2" and SMOLLM2.is_dir() and not args.random:
        dense = CoFiLlamaForCausalLM.from_pretrained(SMOLLM2, dtype=dtype).eval()
        src = "SmolLM2-135M-Instruct, Q4_1-dequantized"
    else:
        cfg = T.LlamaConfig(max_position_embeddings=4096, **SHAPES[args.config])
        torch.manual_seed(0)
        dense = CoFiLlamaForCausalLM(cfg).to(dtype).eval()
        src = f"random weights, {args.config}-shaped config"
    return dense, src


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], cpu_only=True)
    p.add_argument("--config", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--random", action="store_true", help="random weights even when SmolLM2 is set up")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=64, help="prompt length before decoding")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        args.config, args.random, args.batches = "quick", True, [1, 2]
        args.prefill, args.prompt, args.new_tokens, args.rounds = 64, 16, 16, 3
    torch.set_num_threads(args.threads)
    import transformers as T

    dtype = getattr(torch, args.dtype)
    load_start = os.getloadavg()[0]
    dense, source = build(args, dtype)
    bw = read_bandwidth(64 if args.quick else 512)
    print(f"{source}; read bandwidth {bw:.1f} GB/s ({args.threads} threads)")
    tmp = tempfile.TemporaryDirectory(prefix="cofi_bench_generate_")
    dense_compact = fold_llama(dense, None)
    rt_dense = LlamaRuntime(dense_compact)
    hf_dense = T.AutoModelForCausalLM.from_config(dense.config, attn_implementation="sdpa").to(dtype).eval()
    hf_dense.load_state_dict(dense.state_dict(), strict=False)
    if hf_dense.config.tie_word_embeddings:
        hf_dense.tie_weights()
    pruned = {}
    for s in args.sparsity:
        compact = fold_llama(dense, uniform_masks(dense.shape, s))
        folder = export_llama(compact, Path(tmp.name) / f"s{s}")
        hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        n, full = compact.config.num_parameters(), dense_compact.config.num_parameters()
        pruned[s] = (LlamaRuntime(compact), hf, 1 - n["body"] / full["body"])
    V = dense.shape.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for B in args.batches:
        ids = torch.randint(3, V, (B, args.prefill), generator=g)
        prompt = torch.randint(3, V, (B, args.prompt), generator=g)
        for s, (rt_p, hf_p, real_s) in pruned.items():
            rts = {"rt_pruned": rt_p, "rt_dense": rt_dense}
            hfs = {"hf_dense": hf_dense, "hf_pruned": hf_p}
            pre = {k: (lambda r=r, x=ids: r(x, last_only=True)) for k, r in rts.items()}
            pre.update({k: (lambda m=m, x=ids: m(x, logits_to_keep=1)) for k, m in hfs.items()})

            def gen(r, n, x=prompt):
                return lambda: generate(r, x.tolist(), SamplingConfig(max_new_tokens=n))

            def hgen(m, n, x=prompt):
                return lambda: m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=0, eos_token_id=None)

            dec = {}
            for k, r in rts.items():
                dec[k + "@N"], dec[k + "@1"] = gen(r, args.new_tokens), gen(r, 1)
            for k, m in hfs.items():
                dec[k + "@N"], dec[k + "@1"] = hgen(m, args.new_tokens), hgen(m, 1)
            with torch.inference_mode():
                tp = time_interleaved(pre, args.rounds, warmup=1)
                td = time_interleaved(dec, args.rounds, warmup=1)
                mem = {k: peak_rss_growth(dec[k + "@N"]) for k in (*rts, *hfs)}
            fl_ratio = matmul_flops(rt_dense, B, args.prefill) / matmul_flops(rt_p, B, args.prefill)
            T_mid = args.prompt + args.new_tokens // 2
            bound = {k: B * bw * 1e9 / (weight_bytes(r) + kv_bytes(r, B, T_mid)) for k, r in rts.items()}
            bound.update({"hf_dense": bound["rt_dense"], "hf_pruned": bound["rt_pruned"]})
            T_end = args.prompt + args.new_tokens
            for k in (*rts, *hfs):
                r = rts.get(k, rt_p if k == "hf_pruned" else rt_dense)
                step_ms = (td[k + "@N"]["p50_ms"] - td[k + "@1"]["p50_ms"]) / (args.new_tokens - 1)
                tok_s = B * 1e3 / step_ms if step_ms > 0 else float("nan")
                rows.append({"batch": B, "sparsity_target": s, "sparsity": round(real_s, 4), "provider": k,
                             "prefill_ms": tp[k]["p50_ms"], "prefill_p10_ms": tp[k]["p10_ms"],
                             "prefill_p90_ms": tp[k]["p90_ms"], "decode_tok_s": tok_s,
                             "decode_bound_tok_s": bound[k], "decode_efficiency": tok_s / bound[k],
                             "weights_bytes": weight_bytes(r), "kv_cache_bytes": kv_bytes(r, B, T_end),
                             "peak_rss_growth_bytes": mem[k]})
            base = {r["provider"]: r for r in rows[-4:]}
            for r in rows[-4:]:
                r["prefill_vs_rt_dense"] = base["rt_dense"]["prefill_ms"] / r["prefill_ms"]
                r["prefill_vs_hf_dense"] = base["hf_dense"]["prefill_ms"] / r["prefill_ms"]
                r["decode_vs_rt_dense"] = r["decode_tok_s"] / base["rt_dense"]["decode_tok_s"]
                r["decode_vs_hf_dense"] = r["decode_tok_s"] / base["hf_dense"]["decode_tok_s"]
                pr = r["provider"] in ("rt_pruned", "hf_pruned")
                r["prefill_flop_bound"] = fl_ratio if pr else 1.0
                r["prefill_efficiency"] = r["prefill_vs_rt_dense"] / r["prefill_flop_bound"]
            base["rt_pruned"]["decode_vs_hf_pruned"] = (base["rt_pruned"]["decode_tok_s"]
                                                        / base["hf_pruned"]["decode_tok_s"])
            base["rt_pruned"]["prefill_vs_hf_pruned"] = base["hf_pruned"]["prefill_ms"] / base["rt_pruned"]["prefill_ms"]
            for r in rows[-4:]:
                print(f"B={B} s={r['sparsity']:.3f} {r['provider']:9s} prefill {r['prefill_ms']:8.1f} ms "
                      f"(x{r['prefill_vs_rt_dense']:.2f} rt_dense, bound x{r['prefill_flop_bound']:.2f})  "
                      f"decode {r['decode_tok_s']:8.1f} tok/s (bound {r['decode_bound_tok_s']:.0f}, "
                      f"eff {r['decode_efficiency']:.2f}; x{r['decode_vs_hf_dense']:.2f} hf_dense)")
    result = {"meta": {**env_tags("cpu"), "source": source, "dtype": args.dtype, "quick": args.quick,
                       "prefill_tokens": args.prefill, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
                       "read_bandwidth_gb_s": bw, "load_avg": [load_start, os.getloadavg()[0]]},
              "rows": rows}
    name = "generate_quick" if args.quick else f"generate_{args.config}_{args.dtype}"
    print("wrote", write_result(name, result, out=args.out))
    tmp.cleanup()


if __name__ == "__main__":
    main()
