"""Pruned-decoder generation speed (issue 22, "Show"): prefill latency, decode tokens/s and memory
of cofi's runtime on pruned models vs the same runtime dense and transformers, with the bounds
measured in the same run; every provider of a job timed interleaved in one process.

Providers per job (one model config and dtype; random masks with a uniform shape: every layer keeps
the same query heads per K/V group and the same SwiGLU units, so the fold is a stock
LlamaForCausalLM; the FFN width is solved so the body hits the target sparsity; hidden size kept):
- rt_pruned@s: cofi's runtime (``cofi.runtime.llama_runtime``) on the pruned compact model;
- rt_dense:    the same runtime on the dense model (a fold with no masks);
- hf_dense:    transformers on the dense model (prefill: forward with ``logits_to_keep=1``; decode:
               ``generate``, greedy, SDPA attention);
- hf_pruned@s: transformers on the exported stock pruned checkpoint (``export_llama``), same calls.
The dense providers are timed once per job, in the same rounds as every sparsity's pruned ones.
Before timing, each pair that must agree is checked (``check_pairs``, logits at every position of
4 random 32-token prompts): in float32, rt vs transformers within 1e-3 relative. In bf16 the two
round at different places and a pruned model can amplify rounding (SmolLM2 at 50 % with random
masks: both sides 10-20 % from the float32 evaluation, in different directions), so rt vs transformers
proves nothing there: both sides run on float32 copies of the same bf16 weights, which must agree
within 1e-3 (the same function), and each side's bf16 error against that float32 evaluation is
measured: the runtime is refused if its error exceeds 1.5x transformers' plus 2^-8. Both errors
are recorded. ``--check-only`` builds the models, runs the checks, prints them and stops.

Prefill: S-token prompts (512), next-token logits only (the runtime writes its KV cache as in
generation; transformers builds its cache). Decode: greedy, N new tokens after a P-token prompt;
each generated token is timestamped inside the call (the runtime's stream / a transformers logits
processor), tokens/s = B (N - 1) / (t_N - t_1): prefill and setup never enter it.
Memory: weights + KV cache bytes at the end of decoding (counted), and the process's RSS growth
during the first timed decode call (sampled every 2 ms from /proc/self/statm; memory freed by an
earlier call may be reused, so it is a lower bound).
Bounds: read bandwidth = best of 5 ``torch.sum`` over a 512 MiB buffer (copy bandwidth reported
next to it), once per job and again just before every timed decode call (this VM's bandwidth drifts
by +-15 % over minutes, with its neighbours' load); decode bound = that bandwidth over the bytes one
step reads (every weight the step touches incl. the LM head, plus the KV cache at mid-decode), or,
where it takes longer, the step's FLOPs at this machine's float32 matmul rate (best of 3 ``torch.mm``
of 1536 x 1536, per job; batch 8 in float32 is compute-bound on 2 AVX2 cores), in tokens/s, and
decode efficiency = the median over rounds of each call's tokens/s over the bound from
the bandwidth measured just before it; prefill bound = the
matmul FLOP ratio dense / pruned (projections, QK^T and PV causal, one LM-head row per sequence):
efficiency = the measured speed-up over the same library's dense model / that ratio.

The full run (no arguments) is the PLAN below, sized for ~12 minutes on 2 quiet Zen 3 cores: for
SmolLM2 the repetitions are cut, not the cases (bf16 decoding at batch 8: 32 new tokens; the
per-step time is what is measured and the KV cache is a few % of a step's bytes either way); the
Llama-3.2-1B-shaped config (random weights) has fewer rows: fp32 only, batch 1 only (prefill, and
decoding of 32 new tokens), 1 round. transformers' bf16 GEMMs run at a few GFLOP/s on an AVX2-only
CPU (its bf16 prefill at batch 8 alone is ~4 of the 12 minutes). Writes results/cpu/generate.json.
--quick: a small random config in fp32 and bf16 (shows the harness works, not speed).
"""
from __future__ import annotations

import copy
import gc
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import bandwidth, base_parser, env_tags, mem_available, write_result
from cofi.masks.decoder import DecoderMasks, DecoderShape
from cofi.models.llama import CoFiLlamaForCausalLM
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.generate import SamplingConfig, stream
from cofi.runtime.llama_export import export_llama
from cofi.runtime.llama_runtime import LlamaRuntime

SMOLLM2 = Path(os.environ.get("COFI_CACHE", Path.home() / ".cache" / "cofi")) / "smollm2-135m-instruct-q4_1"
SHAPES = {  # random-weight configs
    "quick": {"vocab_size": 4096, "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "smollm2": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "max_position_embeddings": 131072,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}},
}


@dataclass(frozen=True)
class Job:
    """One model config and dtype: prefill {batch: rounds}, decode {batch: (new tokens, rounds)}."""

    config: str
    dtype: str
    prefill: dict[int, int]
    decode: dict[int, tuple[int, int]]


PLAN = [
    Job("smollm2", "float32", {1: 2, 8: 1}, {1: (128, 3), 8: (128, 1)}),
    Job("smollm2", "bfloat16", {1: 1, 8: 1}, {1: (128, 3), 8: (32, 1)}),
    Job("llama-3.2-1b", "float32", {1: 1}, {1: (32, 1)}),
]
QUICK = [Job("quick", "float32", {1: 2, 2: 1}, {1: (8, 2), 2: (8, 1)}),
         Job("quick", "bfloat16", {1: 1, 2: 1}, {1: (8, 1), 2: (8, 1)})]
CHECK_RTOL = 1e-3  # rel. L2 of logits, rt vs transformers, both in float32
CHECK_HALF_RATIO, CHECK_HALF_FLOOR = 1.5, 2.0 ** -8  # bf16: rt error <= ratio x transformers' error + floor


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
    """Bytes of every weight the runtime holds (a tied embedding once)."""
    seen, n = set(), 0
    for t in rt.buffers():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def step_read_bytes(rt: LlamaRuntime, batch: int, kv_length: int) -> int:
    """Bytes one decode step reads: every weight but an untied embedding (of which it reads B rows),
    plus K and V of ``kv_length`` positions."""
    n = weight_bytes(rt)
    if rt.embed.data_ptr() != rt.lm_head.data_ptr():
        n -= (rt.embed.shape[0] - batch) * rt.embed.shape[1] * rt.embed.element_size()
    return n + kv_bytes(rt, batch, kv_length)


def step_flops(rt: LlamaRuntime, batch: int, kv_length: int) -> float:
    """FLOPs of one decode step: 2 x weights x rows for every projection and the LM head, QK^T and PV
    over ``kv_length`` positions."""
    fl = 2.0 * batch * rt.lm_head.numel()
    for layer in rt.layers:
        if layer.attn:
            fl += 2 * batch * (layer.qkv_w.numel() + layer.o_w.numel()) + 4 * batch * layer.nq * rt.head_dim * kv_length
        if layer.mlp:
            fl += 2 * batch * (layer.gu_w.numel() + layer.down_w.numel())
    return fl


def gemm_gflops(n: int = 1536, reps: int = 3) -> float:
    """This machine's float32 matmul rate, GFLOP/s: best of ``reps`` ``torch.mm`` of two n x n."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def kv_bytes(rt: LlamaRuntime, batch: int, length: int) -> int:
    return sum(2 * batch * layer.nk * length * rt.head_dim * rt.embed.element_size() for layer in rt.layers
               if layer.attn)


class RssPeak:
    """Context manager: ``growth`` = bytes the resident set rose above its start (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.page, self.growth = os.sysconf("SC_PAGE_SIZE"), 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> Self:
        self._start = self._peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.growth = max(0, max(self._peak, self._rss()) - self._start)


def rt_decode(rt: LlamaRuntime, prompt: torch.Tensor, n: int) -> list[float]:
    """Greedy decoding of ``n`` tokens; the time each step's tokens were ready."""
    out = []
    for _ in stream(rt, prompt.tolist(), SamplingConfig(max_new_tokens=n)):
        out.append(time.perf_counter())
    if len(out) != n:
        raise RuntimeError(f"bench_generate: the runtime stopped after {len(out)} of {n} tokens")
    return out


def hf_decode(model, prompt: torch.Tensor, n: int) -> list[float]:
    """transformers' greedy ``generate`` of exactly ``n`` tokens; the time each step's logits were ready."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([Stamp()]))
    if out.shape[1] - prompt.shape[1] != n or len(stamps) != n:
        raise RuntimeError(f"bench_generate: transformers generated {out.shape[1] - prompt.shape[1]} of {n} tokens")
    return stamps


def quantiles(v: list[float]) -> dict[str, float]:
    """p50 / p10 / p90 (interpolated within the samples) and n."""
    t = torch.tensor(v, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return {"p50": q[0], "p10": q[1], "p90": q[2], "n": len(v)}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, after: Callable[[str, object, int], None]) -> None:
    """Each round calls every provider once, in turn; ``after(name, result, round)`` gets each result."""
    for i in range(rounds):
        for k, f in fns.items():
            after(k, f(), i)


def build(job: Job, sparsities: list[float], tmp: Path) -> dict:
    """The job's models: dense runtime and transformers model sharing the dense weights, and per
    sparsity the pruned runtime and the exported stock checkpoint loaded by transformers."""
    import transformers as T

    dtype = getattr(torch, job.dtype)
    if job.config == "smollm2" and SMOLLM2.is_dir():
        dense = CoFiLlamaForCausalLM.from_pretrained(SMOLLM2, dtype=dtype).eval()
        source = "SmolLM2-135M-Instruct (Q4_1-dequantized)"
    else:
        cfg = T.LlamaConfig(**{"max_position_embeddings": 4096, **SHAPES[job.config]})
        torch.manual_seed(0)
        dense = CoFiLlamaForCausalLM(cfg).to(dtype).eval()
        source = f"random weights, {job.config}-shaped config"
    with torch.device("meta"):
        hf_dense = T.AutoModelForCausalLM.from_config(dense.config, attn_implementation="sdpa")
    hf_dense.load_state_dict(dense.state_dict(), strict=False, assign=True)
    if hf_dense.config.tie_word_embeddings:
        hf_dense.tie_weights()
    hf_dense.model.rotary_emb = type(hf_dense.model.rotary_emb)(config=hf_dense.config)  # inv_freq: not in the state dict
    hf_dense.eval()
    embed = hf_dense.model.embed_tokens.weight
    full = fold_llama(dense, None)
    models = {"source": source, "rt_dense": share_embedding(LlamaRuntime(full), embed), "hf_dense": hf_dense,
              "pruned": {}}
    base_params = full.config.num_parameters()["body"]
    del full
    for s in sparsities:
        compact = fold_llama(dense, uniform_masks(dense.shape, s))
        folder = export_llama(compact, tmp / f"{job.config}_{job.dtype}_s{s}")
        real = 1 - compact.config.num_parameters()["body"] / base_params
        rt = share_embedding(LlamaRuntime(compact), embed)
        del compact
        gc.collect()
        hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()
        models["pruned"][s] = (rt, share_embedding(hf, embed), real)
    return models


def share_embedding(model, embed: torch.nn.Parameter):
    """``model`` with its tied embedding / LM head replaced by ``embed`` (the dense model's) when the
    values are equal (hidden dims are never pruned here): saves a copy per model (1 GB for the 1B)."""
    if isinstance(model, LlamaRuntime):
        if model.embed.data_ptr() == model.lm_head.data_ptr() and torch.equal(model.embed, embed):
            model.embed = model.lm_head = embed.detach()
    elif model.config.tie_word_embeddings and torch.equal(model.model.embed_tokens.weight, embed):
        model.model.embed_tokens.weight = model.lm_head.weight = embed
    return model


def memory_need(job: Job, sparsities: list[float]) -> int:
    """Estimated peak bytes of ``build`` (weights only): the dense model shared by transformers, the
    dense runtime, per sparsity a runtime and a transformers copy of the pruned body, and the last
    fold's transient (its float32 output, the compact model, the runtime's fused copy)."""
    c = SHAPES[job.config]
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    D = c.get("head_dim", d // c["num_attention_heads"])
    body = L * (2 * d * (c["num_attention_heads"] + c["num_key_value_heads"]) * D + 3 * d * f)
    el = torch.finfo(getattr(torch, job.dtype)).bits // 8
    kept = [1 - s for s in sparsities] or [1.0]
    check = 0 if el >= 4 else (2 * 4 + el) * (V * d + body)  # check_pairs' float32 copies of the dense pair
    return el * (3 * V * d + body * (2 + 2 * sum(kept) + 3 * kept[-1])) + check


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``ref`` (same shape), computed in float64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def check_pairs(pairs: dict[str, tuple[LlamaRuntime, object]], vocab: int) -> dict[str, dict[str, float]]:
    """Per pair (runtime, transformers model of the same weights), logits [4, 32, V] at every
    position of random prompts. float32: ``rt_vs_hf`` <= CHECK_RTOL. bf16 / fp16: ``f32_rt_vs_hf``
    (both models upcast to float32, the weights exactly) <= CHECK_RTOL, then ``rt_err`` and ``hf_err``
    (each side's logits vs transformers' float32 evaluation) with ``rt_err`` <= CHECK_HALF_RATIO x
    ``hf_err`` + CHECK_HALF_FLOOR. Refuses a pair that fails (SystemExit naming the pair and numbers)."""
    ids = torch.randint(3, vocab, (4, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.inference_mode():
        for name, (rt, hf) in pairs.items():
            a, b = rt(ids), hf(ids).logits
            c = out[name] = {"rt_vs_hf": rel_err(a, b)}
            if rt.dtype == torch.float32:
                if not c["rt_vs_hf"] <= CHECK_RTOL:
                    raise SystemExit(f"bench_generate: {name}: runtime and transformers logits differ by "
                                     f"{c['rt_vs_hf']:.2e} relative (allowed {CHECK_RTOL:g}); not timing a wrong model")
                continue
            rt32, hf32 = copy.deepcopy(rt).float(), copy.deepcopy(hf).float()
            ref = hf32(ids).logits
            c["f32_rt_vs_hf"] = rel_err(rt32(ids), ref)
            del rt32, hf32
            gc.collect()
            c["rt_err"], c["hf_err"] = rel_err(a, ref), rel_err(b, ref)
            if not c["f32_rt_vs_hf"] <= CHECK_RTOL:
                raise SystemExit(f"bench_generate: {name}: on float32 copies of the same {str(rt.dtype)[6:]} weights the "
                                 f"runtime and transformers logits differ by {c['f32_rt_vs_hf']:.2e} relative (allowed "
                                 f"{CHECK_RTOL:g}): not rounding; not timing a wrong model")
            if not c["rt_err"] <= CHECK_HALF_RATIO * c["hf_err"] + CHECK_HALF_FLOOR:
                raise SystemExit(f"bench_generate: {name}: the runtime's {str(rt.dtype)[6:]} logits are {c['rt_err']:.2e} "
                                 f"relative from the float32 evaluation of the same weights, transformers' "
                                 f"{c['hf_err']:.2e} (allowed {CHECK_HALF_RATIO:g}x + {CHECK_HALF_FLOOR:.1e}); "
                                 f"not timing a wrong model")
    return out


def check_line(checks: dict[str, dict[str, float]]) -> str:
    """The checks in one line: rt vs hf, or (half) both errors vs the float32 evaluation."""
    return ", ".join(f"{k} rt {c['rt_err']:.1e} / hf {c['hf_err']:.1e} vs f32 (f32 rt vs hf {c['f32_rt_vs_hf']:.0e})"
                     if "rt_err" in c else f"{k} rt vs hf {c['rt_vs_hf']:.1e}" for k, c in checks.items())


def time_prefill(rts: dict[str, LlamaRuntime], hfs: dict, order: list[str], ids: torch.Tensor,
                 rounds: int) -> dict[str, dict]:
    """ms of one prefill of ``ids`` [B, S] per provider (next-token logits only), interleaved rounds."""
    B, S = ids.shape

    def call(k: str) -> float:
        t0 = time.perf_counter()
        if k in rts:
            rts[k](ids, None, rts[k].new_cache(B, S), last_only=True)
        else:
            hfs[k](ids, logits_to_keep=1)
        return (time.perf_counter() - t0) * 1e3

    ms: dict[str, list[float]] = {k: [] for k in order}
    interleaved({k: (lambda k=k: call(k)) for k in order}, rounds, lambda k, v, i: ms[k].append(v))
    return {k: quantiles(v) for k, v in ms.items()}


def time_decode(rts: dict[str, LlamaRuntime], hfs: dict, order: list[str], prompt: torch.Tensor, n: int,
                rounds: int) -> dict[str, dict]:
    """ms per decode step (greedy, ``n`` new tokens after ``prompt`` [B, P]) per provider, interleaved
    rounds, and the RSS growth of each provider's first timed call."""
    def run(k: str, p: torch.Tensor, m: int) -> list[float]:
        return rt_decode(rts[k], p, m) if k in rts else hf_decode(hfs[k], p, m)

    for k in order:  # warm-up: a short generation after a short prompt
        run(k, prompt[:, :8], 4)
    steps: dict[str, list[float]] = {k: [] for k in order}
    bw: dict[str, list[float]] = {k: [] for k in order}
    mem: dict[str, int] = {}

    def call(k: str) -> list[float]:
        bw[k].append(bandwidth(512)[0])
        if k in mem:
            return run(k, prompt, n)
        with RssPeak() as p:
            out = run(k, prompt, n)
        mem[k] = p.growth
        return out

    def record(k: str, stamps: list[float], i: int) -> None:
        steps[k].append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)

    interleaved({k: (lambda k=k: call(k)) for k in order}, rounds, record)
    return {k: quantiles(v) | {"rss": mem[k], "new_tokens": n, "step_ms": v, "read_bw": bw[k]}
            for k, v in steps.items()}


def run_job(job: Job, args, tmp: Path) -> dict:
    t_start = time.perf_counter()
    need, have = memory_need(job, args.sparsity), mem_available()
    if need > have:
        why = f"needs ~{need / 2 ** 30:.1f} GiB of weights, {have / 2 ** 30:.1f} GiB available"
        print(f"[{job.config} {job.dtype}] skipped: {why}", flush=True)
        return {**asdict(job), "skipped": why, "rows": []}
    models = build(job, args.sparsity, tmp)
    rt_d, hf_d = models["rt_dense"], models["hf_dense"]
    rts, hfs, real = {"rt_dense": rt_d}, {"hf_dense": hf_d}, {}
    for s, (rt, hf, r) in models["pruned"].items():
        rts[f"rt_pruned@{s:g}"], hfs[f"hf_pruned@{s:g}"], real[s] = rt, hf, r
    pairs = {"dense": (rt_d, hf_d)} | {f"pruned@{s:g}": (p[0], p[1]) for s, p in models["pruned"].items()}
    checks = check_pairs(pairs, rt_d.vocab_size)
    if args.check_only:
        print(f"[{job.config} {job.dtype}] {models['source']}; logit checks {check_line(checks)}; "
              f"{time.perf_counter() - t_start:.0f} s", flush=True)
        return {**asdict(job), "source": models["source"], "logit_check": checks, "rows": []}
    read_bw, copy_bw = bandwidth(64 if job.config == "quick" else 512)
    peak = gemm_gflops()
    print(f"[{job.config} {job.dtype}] {models['source']}; read {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s, "
          f"matmul {peak:.0f} GFLOP/s; logit checks {check_line(checks)}", flush=True)
    order = ["rt_dense", "hf_dense"] + [k for s in real for k in (f"rt_pruned@{s:g}", f"hf_pruned@{s:g}")]
    rt_of = {k: rt_d if k.endswith("dense") else rts[k.replace("hf_", "rt_")] for k in order}  # weights of k
    V, g = rt_d.vocab_size, torch.Generator().manual_seed(0)
    pre: dict[int, dict[str, dict]] = {}
    dec: dict[int, dict[str, dict]] = {}
    with torch.inference_mode():
        warm = torch.randint(3, V, (1, 32), generator=g)
        for k in order:  # first calls: lazy initialisation out of the timed rounds
            (rts[k](warm, last_only=True) if k in rts else hfs[k](warm, logits_to_keep=1))
        for B, rounds in job.prefill.items():
            pre[B] = time_prefill(rts, hfs, order, torch.randint(3, V, (B, args.prefill), generator=g), rounds)
        for B, (n, rounds) in job.decode.items():
            dec[B] = time_decode(rts, hfs, order, torch.randint(3, V, (B, args.prompt), generator=g), n, rounds)
    rows = []
    for B in sorted(set(job.prefill) | set(job.decode)):
        for k in order:
            rt = rt_of[k]
            s = None if k.endswith("dense") else float(k.split("@")[1])
            lib_dense = "rt_dense" if k.startswith("rt_") else "hf_dense"
            row = {"batch": B, "provider": k.split("@")[0], "sparsity_target": s,
                   "sparsity": 0.0 if s is None else round(real[s], 4), "weights_bytes": weight_bytes(rt)}
            if B in pre:
                p = pre[B][k]
                fl = matmul_flops(rt, B, args.prefill)
                bound = matmul_flops(rt_d, B, args.prefill) / fl
                speedup = pre[B][lib_dense]["p50"] / p["p50"]
                row |= {"prefill_ms": p["p50"], "prefill_p10_ms": p["p10"], "prefill_p90_ms": p["p90"],
                        "prefill_n": p["n"], "prefill_gflop_s": fl / p["p50"] / 1e6,
                        "prefill_flop_bound": bound, "prefill_speedup_vs_lib_dense": speedup,
                        "prefill_efficiency": speedup / bound}
            if B in dec:
                d, n = dec[B][k], dec[B][k]["new_tokens"]
                tok_s = B * 1e3 / d["p50"]
                kv = args.prompt + n // 2
                nbytes, t_flop = step_read_bytes(rt, B, kv), step_flops(rt, B, kv) / (peak * 1e9)

                def step_bound_s(gb: float, nbytes: int = nbytes, t_flop: float = t_flop) -> float:
                    return max(nbytes / (gb * 1e9), t_flop)  # roofline: reading the step's bytes or doing its FLOPs

                # each call against the read bandwidth measured just before it (this machine's
                # bandwidth drifts by +-15 % over minutes), the median over rounds
                eff = statistics.median(step_bound_s(gb) / (ms * 1e-3) for ms, gb in zip(d["step_ms"], d["read_bw"]))
                bw_call = statistics.median(d["read_bw"])
                row |= {"new_tokens": n, "decode_step_ms": d["p50"], "decode_step_p10_ms": d["p10"],
                        "decode_step_p90_ms": d["p90"], "decode_n": d["n"], "decode_tok_s": tok_s,
                        "decode_read_bandwidth_gb_s": bw_call, "decode_bound_tok_s": B / step_bound_s(bw_call),
                        "decode_bound_by": "flops" if t_flop > nbytes / (bw_call * 1e9) else "bandwidth",
                        "decode_efficiency": eff,
                        "kv_cache_bytes": kv_bytes(rt, B, args.prompt + n), "peak_rss_growth_bytes": d["rss"]}
            rows.append(row)
    by = {(r["batch"], r["provider"], r["sparsity_target"]): r for r in rows}
    for r in rows:
        if r["provider"] != "rt_pruned":
            continue
        s, B = r["sparsity_target"], r["batch"]
        for other, key in (("rt_dense", None), ("hf_dense", None), ("hf_pruned", s)):
            o = by[(B, other, key)]
            if "prefill_ms" in r:
                r[f"prefill_vs_{other}"] = o["prefill_ms"] / r["prefill_ms"]
            if "decode_tok_s" in r:
                r[f"decode_vs_{other}"] = r["decode_tok_s"] / o["decode_tok_s"]
        print(f"  B={B} s={r['sparsity']:.3f} rt_pruned: prefill "
              + (f"{r['prefill_ms']:.0f} ms (x{r['prefill_vs_rt_dense']:.2f} rt_dense of bound "
                 f"x{r['prefill_flop_bound']:.2f}, x{r['prefill_vs_hf_dense']:.2f} hf_dense, "
                 f"x{r['prefill_vs_hf_pruned']:.2f} hf_pruned)" if "prefill_ms" in r else "-")
              + "; decode " + (f"{r['decode_tok_s']:.1f} tok/s ({r['decode_efficiency']:.0%} of "
                               f"{r['decode_bound_tok_s']:.0f}; x{r['decode_vs_rt_dense']:.2f} rt_dense, "
                               f"x{r['decode_vs_hf_dense']:.2f} hf_dense, x{r['decode_vs_hf_pruned']:.2f} hf_pruned)"
                               if "decode_tok_s" in r else "-"), flush=True)
    wall = time.perf_counter() - t_start
    print(f"  [{job.config} {job.dtype}] {wall:.0f} s", flush=True)
    return {**asdict(job), "source": models["source"], "read_bandwidth_gb_s": read_bw, "copy_bandwidth_gb_s": copy_bw,
            "gemm_gflop_s": peak,
            "logit_check": checks, "prefill_tokens": args.prefill, "prompt_tokens": args.prompt,
            "wall_s": wall, "rows": rows}


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], cpu_only=True)
    p.add_argument("--config", choices=sorted(SHAPES), nargs="+", help="only these configs of the plan")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), nargs="+", help="only these dtypes of the plan")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt length")
    p.add_argument("--prompt", type=int, default=64, help="prompt length before decoding")
    p.add_argument("--check-only", action="store_true",
                   help="build each job's models, run the logit checks, print them and stop (times and writes nothing)")
    args = p.parse_args()
    plan = QUICK if args.quick else PLAN
    if args.quick:
        args.prefill, args.prompt = 64, 16
    plan = [j for j in plan if (not args.config or j.config in args.config) and (not args.dtype or j.dtype in args.dtype)]
    if not plan:
        raise SystemExit("bench_generate: --config / --dtype select no job of the plan")
    torch.set_num_threads(args.threads)
    load_start, t0 = os.getloadavg()[0], time.perf_counter()
    whole = not (args.config or args.dtype) and args.sparsity == [0.5, 0.7]
    name = "generate_quick" if args.quick else "generate" if whole else (
        "generate_" + "_".join(sorted({j.config for j in plan} | {j.dtype for j in plan})))
    jobs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cofi_bench_generate_") as tmp:
        for job in plan:
            jobs.append(run_job(job, args, Path(tmp)))
            gc.collect()
            if args.check_only:
                continue
            # written after every job: a run cut short keeps what it measured ("complete": false)
            result = {"meta": {**env_tags("cpu"), "quick": args.quick, "sparsity": args.sparsity,
                               "command": "python " + " ".join(shlex.quote(a) for a in
                                                               ["benchmarks/bench_generate.py", *sys.argv[1:]]),
                               "load_avg": [load_start, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0,
                               "complete": len(jobs) == len(plan)},
                      "jobs": jobs}
            path = write_result(name, result, out=args.out)
    if args.check_only:
        print(f"total {time.perf_counter() - t0:.0f} s; checks only, nothing written")
        return
    print(f"total {result['meta']['wall_s']:.0f} s; wrote", path)


if __name__ == "__main__":
    main()
