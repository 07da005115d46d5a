"""``cofi finetune``: fine-tune a pre-trained encoder on a task (the teacher)."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, add_config_arguments, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..data import TaskError
    from .modeling import ModelLoadError
    from .trainer import Trainer

    try:
        cfg = resolve(args, "finetune")
        res = Trainer(cfg, "finetune", resume=args.resume).run()
    except (ConfigError, TaskError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"finetune done: best {res['best_metric']} -> {res['best_dir']}")
    return 0
