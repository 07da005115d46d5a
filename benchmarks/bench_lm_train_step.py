"""One ``cofi prune-lm`` training step at 50 % and 70 % sparsity vs the dense-masked step, same run.

The step is ``cofi.training.lm_prune.LMPruner.train_step``: sampled decoder masks -> masked student
forward (live heads / K/V groups / SwiGLU units gathered, no logits) -> teacher forward (no grad) ->
chunked logit KL + next-token CE (``lm_distill.fused_lm_loss``) -> Lagrangian -> backward -> clip ->
three AdamWs -> log_alpha clamp. Model: a random SmolLM2-135M-shaped Llama (hidden 576, 9 query
heads sharing 3 K/V heads, head_dim 64, SwiGLU 1536, vocab 49152, tied head) with ``--layers``
layers (default 8; SmolLM2 has 30). Sparsity s > 0: log_alpha set to +-4.6 (the clamp bounds) on a random
structure of body sparsity s (``decoder_projection.project_keep_to_sparsity`` of random scores), so
the sampled masks keep that structure; 0 = every log_alpha at +4.6 (every unit computed through
the masked path). log_alpha is restored before every step (a few-KB copy, inside the timed call).
The three pruners share the teacher and the batch; timed interleaved (``time_interleaved``).

Run: PYTHONPATH=python nice .venv/bin/python benchmarks/bench_lm_train_step.py [--quick]
Writes benchmarks/results/cpu/lm_train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from cofi.bench.harness import env_tags, time_interleaved
from cofi.masks.decoder_maskset import DecoderMaskConfig, DecoderMaskSet
from cofi.masks.decoder_projection import project_keep_to_sparsity
from cofi.models.llama import CoFiLlamaForCausalLM
from cofi.training.lm_prune import LMPruneConfig, LMPruner
from cofi.training.optim import Optimizers

OUT = Path(__file__).resolve().parent / "results" / "cpu" / "lm_train_step.json"


class _BenchPruner(LMPruner):
    """An LMPruner built from objects in memory (no folder, no text): what ``train_step`` uses."""

    def __init__(self, cfg: LMPruneConfig, student, teacher, sparsity: float, seed: int) -> None:
        self.cfg, self.device = cfg, torch.device("cpu")
        self.student, self.teacher, self.shape = student, teacher, student.shape
        self.masks = DecoderMaskSet(DecoderMaskConfig(self.shape))
        with torch.no_grad():
            if sparsity > 0:
                self.masks.log_alpha.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
                keep = project_keep_to_sparsity(self.masks, sparsity)
                on = torch.cat([keep[g].reshape(-1) for g in self.masks.cfg.groups])
                self.masks.log_alpha.copy_(torch.where(on, 4.6, -4.6))
            else:
                self.masks.log_alpha.fill_(4.6)
            keep = self.masks.log_alpha.detach() > 0
        self.saved = self.masks.log_alpha.detach().clone()
        self.real = self.masks.real_sparsity(self.masks.masks_from_flat(keep.float()))  # the structure set
        self.target = max(sparsity, 0.01)
        self.mask_gen = torch.Generator().manual_seed(seed)
        self.optim = Optimizers(list(student.named_parameters()), cfg, lr=1e-5, kind="constant", total=10 ** 6,
                                maskset=self.masks)  # type: ignore[arg-type]

    def timed_step(self, ids: torch.Tensor) -> None:
        with torch.no_grad():
            self.masks.log_alpha.copy_(self.saved)
        self.train_step(ids, step=10 ** 6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0,0.5,0.7")
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
    sps = [float(s) for s in args.sparsities.split(",")]
    pruners = {}
    for i, s in enumerate(sps):
        student = CoFiLlamaForCausalLM(hf, init_weights=False)
        student.load_state_dict(teacher.state_dict())
        pruners[f"sparsity_{s:g}"] = _BenchPruner(cfg, student.train(), teacher, s, seed=i + 1)
    ids = torch.randint(0, hf.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    load0 = os.getloadavg()[0]
    res = time_interleaved({k: (lambda p=p: p.timed_step(ids)) for k, p in pruners.items()}, rounds=args.rounds,
                           warmup=1)
    base = res[f"sparsity_{sps[0]:g}"]["p50_ms"]
    rows = []
    for k, p in pruners.items():
        r = res[k]
        rows.append({"case": k, "real_sparsity": round(p.real, 4), "p50_ms": r["p50_ms"], "p10_ms": r["p10_ms"],
                     "p90_ms": r["p90_ms"], "n": r["n"], "speedup_vs_dense_masked": base / r["p50_ms"]})
        print(f"{k}: real sparsity {p.real:.4f}, step {r['p50_ms']:.0f} ms (p10 {r['p10_ms']:.0f}, p90 {r['p90_ms']:.0f}), "
              f"{base / r['p50_ms']:.2f}x the dense-masked step")
    out = {"meta": {**env_tags("cpu"), "layers": args.layers, "batch": args.batch, "seq": args.seq,
                    "shape": "SmolLM2-135M (hidden 576, 9 q / 3 kv heads, SwiGLU 1536, vocab 49152, tied)",
                    "loss": "chunked KL + CE", "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                    "quick": args.quick}, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
