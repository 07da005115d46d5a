"""The teacher's outputs for every training example, computed once before the training loop.

The teacher is frozen and runs in eval mode (no dropout), so its logits and hidden states for an
example never change: the reference recomputes them in every step (one dense teacher forward per
step, the fixed cost that stays when the student's steps get cheaper). Here one length-sorted
inference pass over the training set stores

- ``logits`` [N, C]: the prediction-distillation targets (classification and regression tasks);
- ``states[t]`` [T, d] for each distilled teacher layer t: the hidden states of every example's
  real tokens, concatenated in example order (``offsets`` [N + 1] delimits them).

``lookup`` rebuilds what a teacher forward on a training batch returns (logits [B, C], hidden
states [B, S, d] at the distilled layers, zeros at padding). The layer-distillation loss reads real
tokens only (``layer_distill_loss(token_mask=...)``), so the cached and the per-step teacher give
the same loss up to float rounding (the GEMM shapes of the two passes differ).

Under bf16 / fp16 the pass runs under the caller's autocast (``forward``) and the cache is stored
in float32 (a float64 teacher's in float64): the values the per-step teacher gives after
``precision.outputs_fp32``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch

from .. import data as D
from .precision import fp32


def cache_bytes(lengths: np.ndarray, num_layers: int, hidden: int, num_outputs: int) -> int:
    """Bytes the float32 cache (float64 teachers: twice that) of a dataset with these token ``lengths`` takes."""
    return 4 * (int(lengths.sum()) * num_layers * hidden + len(lengths) * num_outputs)


@dataclass
class TeacherCache:
    logits: torch.Tensor                 # [N, C]
    states: dict[int, torch.Tensor]      # 1-based teacher layer -> [T, d]
    offsets: np.ndarray                  # [N + 1] int64 token offsets into every states[t]
    build_s: float = 0.0

    @property
    def nbytes(self) -> int:
        return self.logits.numel() * self.logits.element_size() + sum(
            s.numel() * s.element_size() for s in self.states.values())

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: torch.nn.Module, data: D.Encoded, layers: Sequence[int], batch_size: int,
              device: torch.device, forward: Callable) -> "TeacherCache":
        """One pass of ``teacher`` (eval mode) over ``data`` in length-sorted batches of ``batch_size``.

        ``forward(model, batch, hidden=bool)`` runs the model (the trainer's helper); ``layers`` are
        the 1-based teacher layers whose hidden states are kept (empty: logits only).
        """
        if teacher.training:
            raise ValueError("cofi.training.TeacherCache.build: the teacher must be in eval mode (dropout off), "
                             "or its outputs would not be reproducible per example")
        t0 = time.perf_counter()
        lengths = data.lengths
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        logits: torch.Tensor | None = None
        states: dict[int, torch.Tensor] = {}
        for idx in D.eval_batches(lengths, batch_size):
            batch = {k: v.to(device) for k, v in data.collate(idx).items()}
            out = forward(teacher, batch, hidden=bool(layers))
            if getattr(out, "logits", None) is None:
                raise ValueError("cofi.training.TeacherCache: the teacher has no sequence-level logits "
                                 "(QA models are distilled with a per-step teacher forward)")
            lg = fp32(out.logits)
            if logits is None:
                logits = torch.empty((len(lengths), lg.shape[-1]), dtype=lg.dtype, device=device)
            rows = torch.as_tensor(idx, device=device)
            logits.index_copy_(0, rows, lg)
            if layers:
                kpm = batch["attention_mask"].to(torch.bool)
                dest = torch.as_tensor(_token_positions(offsets, idx), device=device)
                for t in layers:
                    h = fp32(out.hidden_states[t])
                    if t not in states:
                        states[t] = torch.empty((total, h.shape[-1]), dtype=h.dtype, device=device)
                    states[t].index_copy_(0, dest, h[kpm])
        assert logits is not None
        return cls(logits=logits, states=states, offsets=offsets, build_s=time.perf_counter() - t0)

    def lookup(self, index: np.ndarray, attention_mask: torch.Tensor) -> SimpleNamespace:
        """What the teacher returns for the batch of examples ``index`` [B] padded as ``attention_mask`` [B, S].

        Returns ``.logits`` [B, C] and ``.hidden_states``: a list indexed like a model's hidden
        states, [B, S, d] at the cached layers (zeros at padding), None elsewhere.
        """
        idx = np.asarray(index, dtype=np.int64)
        rows = torch.as_tensor(idx, device=self.logits.device)
        logits = self.logits.index_select(0, rows)
        hidden: list[torch.Tensor | None] = []
        if self.states:
            kpm = attention_mask.to(torch.bool)
            n_real = (self.offsets[idx + 1] - self.offsets[idx])
            got = kpm.sum(1).cpu().numpy()
            if not np.array_equal(got, n_real):
                raise ValueError(f"cofi.training.TeacherCache.lookup: attention_mask has {got.tolist()} tokens per "
                                 f"row but the cached examples have {n_real.tolist()}")
            src = torch.as_tensor(_token_positions(self.offsets, idx), device=self.logits.device)
            hidden = [None] * (max(self.states) + 1)
            B, S = kpm.shape
            for t, flat in self.states.items():
                h = flat.new_zeros((B, S, flat.shape[-1]))
                h[kpm] = flat.index_select(0, src)
                hidden[t] = h
        return SimpleNamespace(logits=logits, hidden_states=hidden)


def _token_positions(offsets: np.ndarray, idx: Sequence[int]) -> np.ndarray:
    """Flat token positions of examples ``idx`` in order (row-major order of their real tokens)."""
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]) if len(idx) else \
        np.zeros(0, dtype=np.int64)
