"""``cofi finetune``: fine-tune a pre-trained encoder on a task (the teacher)."""
from __future__ import annotations

import argparse

from .config_cli import add_config_arguments, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, command="finetune")


def run(args: argparse.Namespace) -> int:
    """User mistakes raise :class:`cofi.errors.UserError`; ``cofi.cli.main`` prints them as one line."""
    from .trainer import Trainer

    cfg = resolve(args, "finetune")
    res = Trainer(cfg, "finetune", resume=args.resume).run()
    print(f"finetune done: best {res['best_metric']} -> {res['best_dir']}")
    return 0
