"""The ``cofi`` command: info, finetune, prune, eval, export, generate, bench, demo.

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, so importing it stays cheap.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """Argument mistakes end in one line, like every other user mistake (``--help`` shows usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def int_at_least(low: int, what: str = "an integer"):
    """argparse ``type=``: an int >= ``low``; the error says what was given and what is allowed."""

    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be {what} >= {low}, got {v}")
        return v

    conv.__name__ = f"int >= {low}"
    return conv


# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("cofi.info", "versions, build flags, backends and devices"),
    "finetune": ("cofi.training.cli_finetune", "fine-tune a pre-trained encoder on a task (the teacher)"),
    "prune": ("cofi.training.cli_prune", "CoFi pruning with distillation, then fold and fine-tune the compact model"),
    "prune-lm": ("cofi.training.cli_prune_lm", "prune a Llama-family decoder on local text (masks, Lagrangian to a sparsity or shape, chunked logit distillation), fold it"),
    "eval": ("cofi.runtime.cli_eval", "evaluate a compact (or fine-tuned full) model folder on a task or your own data"),
    "export": ("cofi.runtime.cli_export", "export a compact model folder to ONNX or torch.export"),
    "generate": ("cofi.runtime.cli_generate", "generate text from a pruned (or dense) Llama-family decoder, streamed"),
    "bench": ("cofi.bench.cli", "op microbenchmarks on this machine: same-run ratios vs the references"),
    "demo": ("cofi.pipeline", "the whole pipeline on the bundled default (README command 1); --preset llm: the decoder job"),
}


def main(argv: list[str] | None = None) -> int:
    # transformers' weight-loading bars would sit between a user's command and its one-line error
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = _Parser(prog="cofi", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (mod_name, help_) in COMMANDS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is not None and e.name.startswith("cofi"):
                continue  # subcommand not part of this install
            raise
        p = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    from .errors import UserError

    try:
        return int(modules[args.command].run(args) or 0)
    except UserError as e:
        # a user mistake: one line, no traceback (anything else is a bug and keeps its traceback)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
