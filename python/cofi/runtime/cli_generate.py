"""``cofi generate DIR --prompt TEXT``: generate text with cofi's decoder runtime, streamed to stdout.

DIR: a compact decoder folder (cofi_llama.json, as the fold or ``export_llama`` writes it) or a
transformers Llama / Qwen2 / Mistral folder (dense, or a stock export of a pruned model). The
tokenizer comes from DIR (or ``--tokenizer``); ``--prompt-ids`` takes token ids instead (folders
without a tokenizer), and the new ids are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def load_decoder(folder: str | Path, dtype: torch.dtype | None = None):
    """A ``CompactLlamaForCausalLM`` from a compact folder, or a transformers folder folded with no
    masks (the same weights, cofi's layout)."""
    from .compact_llama import CompactLlamaForCausalLM

    f = Path(folder)
    if (f / "cofi_llama.json").is_file():
        model = CompactLlamaForCausalLM.from_pretrained(f)
    elif (f / "config.json").is_file():
        from ..models.llama import CoFiLlamaForCausalLM
        from ..pruning.fold_llama import fold_llama

        model = fold_llama(CoFiLlamaForCausalLM.from_pretrained(f, dtype=dtype), None)
    else:
        raise UserError(f"cofi generate: DIR must hold cofi_llama.json or a transformers config.json, got {f}")
    return model.to(dtype) if dtype is not None else model


def _stop_tokens(folder: Path, extra: list[int]) -> tuple[int, ...]:
    ids = list(extra)
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            eos = json.loads(p.read_text()).get("eos_token_id")
            if eos is not None:
                ids += eos if isinstance(eos, list) else [eos]
                break
    return tuple(dict.fromkeys(ids))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import int_at_least

    p.add_argument("folder", metavar="DIR", help="compact decoder folder or transformers Llama-family folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: DIR)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"cofi generate: --prompt-ids must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from .generate import SamplingConfig, stream
    from .llama_runtime import LlamaRuntime

    folder = Path(args.folder)
    if not (folder / "cofi_llama.json").is_file() and not (folder / "config.json").is_file():
        raise UserError(f"cofi generate: DIR must hold cofi_llama.json or a transformers config.json, got {folder}")
    tok = None
    if args.prompt is not None:
        tdir = Path(args.tokenizer or folder)
        if not (tdir / "tokenizer.json").is_file() and not (tdir / "tokenizer.model").is_file():
            raise UserError(f"cofi generate: --prompt needs a tokenizer in {tdir} (tokenizer.json); pass "
                            "--tokenizer DIR or --prompt-ids")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tdir))
        prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in args.prompt]
    else:
        prompts = [_parse_ids(t) for t in args.prompt_ids]
    runtime = LlamaRuntime(load_decoder(folder, _DTYPES[args.dtype]).eval())
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_tokens=_stop_tokens(folder, args.stop), seed=args.seed,
                         pad_token_id=pad)
    for p in prompts:
        if any(not 0 <= t < runtime.vocab_size for t in p):
            raise UserError(f"cofi generate: prompt token ids must be in [0, {runtime.vocab_size}), got {p}")
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    shown = ""
    for step in stream(runtime, prompts, cfg):
        for i, t in enumerate(step.tolist()):
            if not ended[i]:
                out[i].append(t)
                ended[i] = t in cfg.stop_tokens
        if len(prompts) == 1:  # stream the single completion as it grows
            text = tok.decode(out[0], skip_special_tokens=True) if tok is not None else " ".join(map(str, out[0]))
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for i, ids in enumerate(out):
            text = tok.decode(ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, ids))
            print(f"[{i}] {text}")
    return 0
