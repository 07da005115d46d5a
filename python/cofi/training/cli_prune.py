"""``cofi prune``: CoFi pruning with distillation, then fold the masks and fine-tune the compact
model (stage 2; ``--skip-compact true`` stops after pruning). Multi-process:
``torchrun --nproc_per_node=N -m cofi.cli prune ...``."""
from __future__ import annotations

import argparse
import json

from .config_cli import add_config_arguments, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, command="prune")


def run(args: argparse.Namespace) -> int:
    """User mistakes raise :class:`cofi.errors.UserError`; ``cofi.cli.main`` prints them as one line."""
    from .trainer import Trainer

    cfg = resolve(args, "prune")
    t = Trainer(cfg, "prune", resume=args.resume)
    res = t.run()
    if t.dist.main:
        print("prune done: " + json.dumps(res, default=str))
    return 0
