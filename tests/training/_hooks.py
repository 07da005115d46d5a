"""Test-only entry and callbacks: run ``cofi prune`` / ``cofi finetune`` argument lists with
``Trainer(..., callbacks=[...])`` (the CLI installs none), e.g. to die like a preempted job at a
step or to dump every rank's final weights."""
from __future__ import annotations

import os
import signal

import torch

from cofi.training.loop import Callback


class KillAt(Callback):
    """SIGKILL the process right after step ``step`` of ``stage``."""

    def __init__(self, stage: str, step: int) -> None:
        self.at = (stage, int(step))

    def on_step_end(self, stage: str, step: int) -> None:
        if (stage, step) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpRanks(Callback):
    """Every rank's final weights (and mask parameters) in ``output_dir/rank<r>.pt``."""

    def on_run_end(self, trainer) -> None:
        st = {"model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}}
        if trainer.compact_result is None and trainer.ctx.maskset is not None:
            st["maskset"] = {k: v.detach().cpu() for k, v in trainer.ctx.maskset.state_dict().items()}
        torch.save(st, trainer.folder.out / f"rank{trainer.dist.rank}.pt")


class NanAt(Callback):
    """From step ``step`` of ``stage`` on, ``model``'s weights are NaN (a diverged run)."""

    def __init__(self, stage: str, step: int, model: torch.nn.Module | None = None) -> None:
        self.at, self.model = (stage, int(step)), model

    def on_step_end(self, stage: str, step: int) -> None:
        if (stage, step) == self.at:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))


def run(argv: list[str], callbacks=()) -> int:
    """``cofi.cli.main(argv)`` for finetune / prune with ``callbacks`` installed in the trainer."""
    import argparse

    from cofi.errors import UserError
    from cofi.training.config_cli import add_config_arguments, resolve
    from cofi.training.trainer import Trainer

    command, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"cofi {command}")
    add_config_arguments(p, command)
    args = p.parse_args(rest)
    try:
        cfg = resolve(args, command)
        Trainer(cfg, command, resume=args.resume, callbacks=list(callbacks)).run()
    except UserError as e:
        print(f"error: {e}")
        return 2
    return 0
