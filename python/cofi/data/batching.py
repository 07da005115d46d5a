"""Deterministic, resumable batch orders: length-grouped (dynamic padding) or plain random.

The order of epoch ``e`` depends only on (seed, e), so a run resumed at (epoch, batch index)
sees exactly the batches an uninterrupted run would. With ``group_by_length`` the indices are
shuffled, cut into mega-batches of ``mega`` batches, sorted by length inside each, chunked into
batches and the batch order shuffled: padding drops ~2x on short-sentence tasks (docs/measuring.md).
"""
from __future__ import annotations

import numpy as np


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, *,
                  group_by_length: bool = True, drop_last: bool = False, mega: int = 50) -> list[np.ndarray]:
    """The list of index batches of one training epoch (global batches; ranks slice them)."""
    if batch_size < 1:
        raise ValueError(f"cofi.data: batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    perm = rng.permutation(n)
    if group_by_length:
        chunks = []
        step = batch_size * mega
        for i in range(0, n, step):
            mb = perm[i: i + step]
            mb = mb[np.argsort(-lengths[mb], kind="stable")]
            chunks.extend(mb[j: j + batch_size] for j in range(0, len(mb), batch_size))
    else:
        chunks = [perm[j: j + batch_size] for j in range(0, n, batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks = chunks[:-1]
    if group_by_length:
        order = rng.permutation(len(chunks))
        chunks = [chunks[k] for k in order]
    return chunks


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Eval order: sorted by length (least padding); callers scatter results back by index."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of a global batch (contiguous, sizes differ by at most one)."""
    if world == 1:
        return batch
    bounds = np.linspace(0, len(batch), world + 1).round().astype(int)
    return batch[bounds[rank]: bounds[rank + 1]]
