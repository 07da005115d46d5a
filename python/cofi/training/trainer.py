"""The CoFi trainer: runs one command for a resolved config.

``finetune``: stage ``finetune`` (finetune.py). ``prune``: stage ``prune`` (prune.py), then unless
``skip_compact`` stage ``compact`` (compact.py: fold the masks, fine-tune the compact model).
Each stage is run by the generic loop (loop.py) with checkpoints (state.py) in the run's output
folder (run_folder.py: locked, refused when re-used without ``--resume`` / ``--overwrite``).
A resumed run is bitwise the uninterrupted one: checkpoints hold every rank's RNG states, and
metrics.jsonl (metrics_log.py) is cut back to the steps the checkpoint reached.

Where to find the rest: task.py (task data, forward, loss terms), optim.py (optimizers and
schedules), evaluate.py (metrics, QA post-processing), artifacts.py (model folders, results.json),
context.py (what the stages share, built from the config), distributed.py (data parallel).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import artifacts as A
from . import distributed as dd
from ..errors import UserError
from .compact import CompactStage, fold, load_pruned
from .config import TrainConfig
from .context import RunContext, build_context
from .finetune import FinetuneStage
from .loop import Callback
from .prune import PruneStage
from .run_folder import RunFolder


class Trainer:
    """Runs one command (``finetune`` or ``prune``) for a resolved config. The constructor claims
    the output folder and builds everything the run needs (task, models, the first stage and its
    optimizers); ``run()`` sequences the stages. ``callbacks``: ``loop.Callback`` hooks."""

    def __init__(self, cfg: TrainConfig, command: str, *, resume: bool = False, log: Callable[[str], None] | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        if command not in ("finetune", "prune"):
            raise ValueError(f"cofi.training: command must be finetune or prune, got {command!r}")
        if resume and cfg.overwrite:
            raise UserError("cofi: --resume continues the run in output_dir and --overwrite deletes it; pass one of them")
        self.cfg, self.command = cfg, command
        self.dist = dd.init(cfg.device)
        self.device = torch.device(cfg.device)
        self._print = log or print
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.folder = RunFolder(cfg, command, resume, self.dist, self.device, self.log)
        self.folder.claim()
        try:
            self.ctx: RunContext = build_context(cfg, command, self.dist, self.device, self.folder, self.log,
                                                 tuple(callbacks))
            self.stage: FinetuneStage | PruneStage = FinetuneStage(self.ctx) if command == "finetune" \
                else PruneStage(self.ctx)
        except BaseException:
            self.folder.release()
            raise
        self.model: torch.nn.Module = self.ctx.student  # the model the last stage trained
        self.prune_result: dict | None = None
        self.compact_result: dict | None = None

    def log(self, msg: str) -> None:
        if self.dist.main:
            self._print(msg)

    def train_step(self, batch: dict, step: int = 0) -> dict:
        """One step of the current stage (``finetune`` or ``prune``) on ``batch`` at loop step
        ``step``, exactly as ``run()`` takes it (benchmarks time this)."""
        return self.stage.train_step(batch, step)

    def release(self) -> None:
        """Give up the output folder's lock."""
        self.folder.release()

    def run(self) -> dict:
        try:
            res = self._run_finetune() if self.command == "finetune" else self._run_prune()
            for cb in self.ctx.callbacks:
                cb.on_run_end(self)
            return res
        finally:
            self.release()

    def _run_finetune(self) -> dict:
        st = self.folder.find_resume(self.ctx.shapes_of, self.ctx.metrics)
        return self.stage.run(st)

    def _run_prune(self) -> dict:
        st = self.folder.find_resume(self.ctx.shapes_of, self.ctx.metrics)
        if st is not None and st["stage"] == "compact":
            self.prune_result = st.get("prune_result")
            if self.cfg.skip_compact:
                self.log("[prune] --skip-compact: the pruning stage is complete; the compact stage is not resumed")
                self._write_results()
                return self.prune_result
            return self._run_compact(st)
        self.prune_result = self.stage.run(st)
        if self.cfg.skip_compact:
            self._write_results()
            return self.prune_result
        return self._run_compact(None)

    def _run_compact(self, st: dict | None) -> dict:
        dd.barrier(self.dist)
        try:
            masks, src = load_pruned(self.ctx)
        except UserError:
            self._write_results()
            raise
        self.model = fold(self.ctx, masks, src)
        stage = CompactStage(self.ctx, self.model, src, self.prune_result)
        self.compact_result = stage.run(st)
        self._write_results()
        return {"prune": self.prune_result, "compact": self.compact_result}

    def _write_results(self) -> None:
        if self.dist.main:
            A.write_results(self.folder.out, {"prune": self.prune_result, "compact": self.compact_result,
                                              "metric": self.ctx.metric_name})
        dd.barrier(self.dist)
