"""Causal-LM token streams: documents tokenized and packed into fixed-length sequences.

Packing rule: each document is tokenized without special tokens, followed by the tokenizer's EOS
token (when it has one), and the documents are concatenated in order into one stream, which is cut
into consecutive sequences of ``seq_len`` tokens; the tail shorter than ``seq_len`` is dropped.
A sequence may therefore span a document boundary (the EOS token marks it), as in GPT-style and
Sheared-LLaMA pretraining data; labels are the inputs (the model shifts them).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .lm_text import LMDataError


def tokenize_documents(tokenizer: Any, docs: Sequence[str]) -> list[list[int]]:
    """Token ids of each document, no special tokens added (BOS/EOS are the packer's choice)."""
    ids = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    return [list(map(int, d)) for d in ids]


def pack(token_docs: Sequence[Sequence[int]], seq_len: int, eos_id: int | None) -> torch.Tensor:
    """[num_sequences, seq_len] int64 from the token documents (rule in the module docstring)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise LMDataError(f"seq_len must be an int >= 2, got {seq_len!r}")
    sep = [] if eos_id is None else [int(eos_id)]
    stream = [t for doc in token_docs for t in (*doc, *sep)]
    n = len(stream) // seq_len
    if n == 0:
        raise LMDataError(f"the text gives {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def packed_sequences(tokenizer: Any, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenize and pack ``docs`` with the tokenizer's EOS token as the separator."""
    return pack(tokenize_documents(tokenizer, docs), seq_len, getattr(tokenizer, "eos_token_id", None))


def sequence_batches(seqs: torch.Tensor, batch_size: int, *, seed: int | None = None) -> list[torch.Tensor]:
    """Batches [<= batch_size, seq_len] of the packed sequences, shuffled by ``seed`` (None: in order)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LMDataError(f"batch_size must be an int >= 1, got {batch_size!r}")
    order = torch.arange(len(seqs)) if seed is None else torch.randperm(
        len(seqs), generator=torch.Generator().manual_seed(seed))
    return [seqs[order[i: i + batch_size]] for i in range(0, len(seqs), batch_size)]
