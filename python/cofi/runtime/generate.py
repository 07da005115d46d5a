"""Token generation on ``LlamaRuntime``: batched prompts of different lengths (left padded), greedy or
sampled (temperature, top-k, top-p, seed), stop tokens, streamed one step at a time.

Sampling follows transformers' order: logits / temperature, then top-k, then top-p (the smallest set
of most likely tokens whose probability reaches ``top_p``; the most likely token always stays), then
one multinomial draw per row from a ``torch.Generator`` seeded with ``seed`` (same seed, same tokens).
``temperature == 0`` is greedy (argmax), as transformers' ``do_sample=False``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from .llama_runtime import LlamaRuntime


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0 / top_p 1.0 = off; stop_tokens end a row (the stop token is
    emitted, then the row only pads); seed for the sampling generator (None: nondeterministic)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None
    pad_token_id: int = 0

    def check(self, vocab_size: int) -> None:
        who = "cofi.runtime.generate"
        if self.max_new_tokens < 1:
            raise UserError(f"{who}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise UserError(f"{who}: temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"{who}: top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"{who}: top_p must be in (0, 1] (1 = off), got {self.top_p}")
        for t in (*self.stop_tokens, self.pad_token_id):
            if not 0 <= t < vocab_size:
                raise UserError(f"{who}: stop and pad token ids must be in [0, {vocab_size}), got {t}")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask ``[B, max_len]`` (int64), each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError(f"cofi.runtime.generate: prompts must be a non-empty list of non-empty token lists, got "
                        f"lengths {[len(p) for p in prompts]}")
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(prompts), S, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, S - len(p):] = torch.as_tensor(list(p), dtype=torch.int64)
        mask[i, S - len(p):] = 1
    return ids.to(device), mask.to(device)


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits ``[B, V]`` -> token ids ``[B]`` (greedy or sampled as ``cfg`` says)."""
    if cfg.temperature == 0.0:
        return logits.float().argmax(-1)  # same index (widening is exact); torch's bf16 argmax is ~4x slower
    scores = logits.float() / cfg.temperature
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1.0 - cfg.top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def stream(runtime: LlamaRuntime, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (int64 ``[B]``, on the CPU) per step; rows that stopped
    yield ``pad_token_id``. Stops after ``max_new_tokens`` or when every row has stopped."""
    cfg.check(runtime.vocab_size)
    ids, mask = left_pad(prompts, cfg.pad_token_id, runtime.device)
    B, S = ids.shape
    gen = None
    if cfg.temperature > 0.0:
        gen = torch.Generator(device=runtime.device)
        if cfg.seed is None:
            gen.seed()
        else:
            gen.manual_seed(cfg.seed)
    stop = torch.tensor(cfg.stop_tokens or [-1], dtype=torch.int64, device=runtime.device)
    done = torch.zeros(B, dtype=torch.bool, device=runtime.device)
    with torch.inference_mode():
        cache = runtime.new_cache(B, S + cfg.max_new_tokens)
        logits = runtime(ids, None if bool(mask.all()) else mask, cache, last_only=True)[:, -1]
        for step in range(cfg.max_new_tokens):
            tok = next_tokens(logits, cfg, gen)
            if cfg.stop_tokens:  # without stop tokens no row ever stops (a few ops a step saved)
                tok = torch.where(done, torch.full_like(tok, cfg.pad_token_id), tok)
                done = done | torch.isin(tok, stop)
            yield tok.cpu()
            if step + 1 == cfg.max_new_tokens or (cfg.stop_tokens and bool(done.all())):
                return
            logits = runtime(tok[:, None], None, cache, last_only=True)[:, -1]


def generate(runtime: LlamaRuntime, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> list[list[int]]:
    """The new tokens of each prompt, up to and including its stop token (padding after it dropped)."""
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    for tok in stream(runtime, prompts, cfg):
        for i, t in enumerate(tok.tolist()):
            if not ended[i]:
                out[i].append(t)
                ended[i] = t in cfg.stop_tokens
    return out


__all__ = ["SamplingConfig", "generate", "left_pad", "next_tokens", "stream"]
