"""One ``cofi prune-lm`` training step at 50 % and 70 % sparsity vs the dense-masked step, same run.

The step is ``cofi.training.lm_prune.LMPruner.train_step``: hard-concrete mask step (sample,
expected size) -> masked student forward -> teacher forward (no grad) -> chunked logit KL +
next-token CE (``lm_distill.fused_lm_loss``) -> Lagrangian -> backward -> clip -> three AdamWs ->
log_alpha clamp. Model: a random SmolLM2-135M-shaped Llama (hidden 576, 9 query heads sharing 3
K/V heads, head_dim 64, SwiGLU 1536, vocab 49152, tied head) with ``--layers`` layers (SmolLM2 has
30), fp32.

Cases (one pruner each, all timed interleaved, ``time_interleaved``):

- ``dense_masked_s0``: the student with ``backend="dense"`` (full width, every head and unit
  computed, masks multiplied, cofi's reference ops) at sparsity 0: the baseline;
- ``compact_s0``: ``backend="compact"`` (live units only, cofi's fused ops) at sparsity 0;
- ``compact_s0.5`` / ``compact_s0.7``: compact at 50 % / 70 % body sparsity.

Masks: deterministic, of a uniform shape: every layer keeps both sublayers, the same number of
hidden dims (a multiple of 32 near 576 sqrt(1 - s)), all 3 K/V groups with round(3 sqrt(1 - s))
query heads each, and the SwiGLU width that puts the folded body closest to sparsity s; which dims,
heads and units are random (seeded) and differ per layer. log_alpha is +-20 on that structure, so
the sampled gates are exactly 1 / 0 (at +-20 a hard-concrete sample is never inside (0, 1) in
fp32); it is restored before every step (a few-KB copy inside the timed call), as the optimiser
moves it. The teacher (shared) is the unmasked model, compact backend.

Run: nice .venv/bin/python benchmarks/bench_lm_train_step.py [--quick]; writes
benchmarks/results/cpu/lm_train_step.json (``--out`` elsewhere). The full run (default 8 layers,
batch 8 x 256, 3 rounds after 1 warm-up step of each case: 16 steps) is sized for about 5 minutes on
2 quiet cores (estimated from the issue's 11.8 s fp32 step of the 30-layer model at 8 x 256).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from cofi import ops as cops
from cofi.bench.harness import env_tags, time_interleaved
from cofi.masks.decoder import DecoderShape, full_size, real_size
from cofi.masks.decoder_maskset import DecoderMaskConfig, DecoderMaskSet
from cofi.models.llama import CoFiLlamaForCausalLM
from cofi.training.distributed import DistInfo
from cofi.training.lm_prune import LMPruneConfig, LMPruner
from cofi.training.optim import Optimizers

OUT = Path(__file__).resolve().parent / "results" / "cpu" / "lm_train_step.json"
SATURATED = 20.0


def uniform_keep(ms: DecoderMaskSet, sparsity: float, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """0/1 flat keep [n] of a uniform shape of body sparsity ~``sparsity`` (module docstring) and the shape."""
    s: DecoderShape = ms.shape
    L, d, G, m_full, F_ = s.num_layers, s.hidden_size, s.num_kv_heads, s.group_size, s.intermediate_size
    keep = torch.zeros_like(ms.log_alpha, dtype=torch.float32)
    view = {g: ms.group_view(keep, g) for g in ms.cfg.groups}
    for g in ("mha", "ffn", "kv"):
        if g in view:
            view[g].fill_(1.0)
    if sparsity <= 0:
        keep.fill_(1.0)
        return keep, {"hidden": d, "heads": s.num_heads, "kv_heads": G, "intermediate": F_}
    a = math.sqrt(1.0 - sparsity)
    hid = min(d, max(32, 32 * round(d * a / 32)))
    per_group = min(m_full, max(1, round(m_full * a)))
    view["hidden"][torch.randperm(d, generator=gen)[:hid]] = 1.0
    for l in range(L):
        for g in range(G):
            heads = g * m_full + torch.randperm(m_full, generator=gen)[:per_group]
            view["head"][l, heads] = 1.0

    def body(f: int) -> int:
        for l in range(L):
            view["intermediate"][l].zero_()
            view["intermediate"][l, torch.randperm(F_, generator=gen)[:f]] = 1.0
        return real_size(ms.masks_from_flat(keep), s)["body"]

    want = (1.0 - sparsity) * full_size(s)["body"]
    b1, b2 = body(1), body(2)  # the body is linear in the width f >= 1
    f = min(F_, max(1, round(1 + (want - b1) / (b2 - b1))))
    body(f)
    return keep, {"hidden": hid, "heads": per_group * G, "kv_heads": G, "intermediate": f}


class _BenchPruner(LMPruner):
    """An LMPruner built from objects in memory (no folder, no text): what ``train_step`` uses."""

    def __init__(self, cfg: LMPruneConfig, student: CoFiLlamaForCausalLM, teacher: CoFiLlamaForCausalLM,
                 sparsity: float, seed: int) -> None:
        self.cfg, self.device = cfg, torch.device("cpu")
        self.student, self.teacher, self.shape = student, teacher, student.shape
        self.par = _NoParallel()
        self.masks = DecoderMaskSet(DecoderMaskConfig(self.shape))
        keep, self.kept_shape = uniform_keep(self.masks, sparsity, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            self.masks.log_alpha.copy_(torch.where(keep > 0, SATURATED, -SATURATED))
        self.saved = self.masks.log_alpha.detach().clone()
        self.real = self.masks.real_sparsity(self.masks.masks_from_flat(keep))
        self.target = max(sparsity, 0.01)
        self.mask_gen = torch.Generator().manual_seed(seed)
        self.optim = Optimizers(list(student.named_parameters()), cfg, lr=1e-5, kind="constant", total=10 ** 6,
                                maskset=self.masks)  # type: ignore[arg-type]

    def timed_step(self, ids: torch.Tensor) -> None:
        with torch.no_grad():
            self.masks.log_alpha.copy_(self.saved)
        self.train_step(ids, step=10 ** 6)


class _NoParallel:
    """LMPruner's data-parallel hooks for one process (identity)."""

    dist = DistInfo()

    def local(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def mean(self, rec: dict) -> dict:
        return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,0.7", help="compact cases besides sparsity 0")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 128, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.batch, args.seq, args.rounds = 2, 2, 128, 2
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=args.layers, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, intermediate_size=1536, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)
    torch.manual_seed(0)
    teacher = CoFiLlamaForCausalLM(hf).eval().requires_grad_(False)
    cfg = LMPruneConfig(model="", output_dir="", kl_weight=1.0, ce_weight=1.0, loss_chunk=1024)
    cases = [("dense_masked_s0", "dense", 0.0), ("compact_s0", "compact", 0.0)]
    cases += [(f"compact_s{float(s):g}", "compact", float(s)) for s in args.sparsities.split(",") if s.strip()]
    pruners: dict[str, _BenchPruner] = {}
    for i, (name, backend, s) in enumerate(cases):
        student = CoFiLlamaForCausalLM(hf, init_weights=False)
        student.load_state_dict(teacher.state_dict())
        student.backend = backend
        pruners[name] = _BenchPruner(cfg, student.train(), teacher, s, seed=i + 1)
    ids = torch.randint(0, hf.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()[0]
    ran = {}
    for name, p in pruners.items():  # the warm-up step of each, recording which op backends ran
        cops.reset_stats()
        p.timed_step(ids)
        ran[name] = sorted({f"{op}:{be}" for (op, be, *_), _ in cops.backend_stats().items()})
    res = time_interleaved({k: (lambda p=p: p.timed_step(ids)) for k, p in pruners.items()}, rounds=args.rounds,
                           warmup=0)
    base, c0 = res["dense_masked_s0"]["p50_ms"], res["compact_s0"]["p50_ms"]
    rows = []
    for (name, backend, s), p in zip(cases, pruners.values()):
        r = res[name]
        rows.append({"case": name, "backend": backend, "sparsity": s, "real_sparsity": round(p.real, 4),
                     "kept_shape": p.kept_shape, "p50_ms": r["p50_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                     "n": r["n"], "speedup_vs_dense_masked": base / r["p50_ms"],
                     "speedup_vs_compact_s0": c0 / r["p50_ms"], "ops_ran": ran[name]})
        print(f"{name}: real sparsity {p.real:.4f} {p.kept_shape}, step {r['p50_ms']:.0f} ms (p10 {r['p10_ms']:.0f}, "
              f"p90 {r['p90_ms']:.0f}), {base / r['p50_ms']:.2f}x dense-masked, {c0 / r['p50_ms']:.2f}x compact s0")
    out = {"meta": {**env_tags("cpu"), "layers": args.layers, "batch": args.batch, "seq": args.seq, "dtype": "fp32",
                    "shape": "SmolLM2-135M (hidden 576, 9 q / 3 kv heads, SwiGLU 1536, vocab 49152, tied)",
                    "loss": "chunked KL + CE", "masks": "deterministic (log_alpha +-20), uniform shape per layer",
                    "rounds": args.rounds, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                    "quick": args.quick}, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
