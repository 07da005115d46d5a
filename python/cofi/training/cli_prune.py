"""``cofi prune``: CoFi pruning with distillation, then fold the masks and fine-tune the compact
model (stage 2; ``--skip-compact true`` stops after pruning). Multi-process:
``torchrun --nproc_per_node=N -m cofi.cli prune ...``."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, add_config_arguments, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..data import TaskError
    from .modeling import ModelLoadError
    from .trainer import Trainer

    try:
        cfg = resolve(args, "prune")
        t = Trainer(cfg, "prune", resume=args.resume)
        res = t.run()
    except (ConfigError, TaskError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if t.dist.main:
        print("prune done: " + json.dumps(res, default=str))
    return 0
