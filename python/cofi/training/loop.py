"""The generic training loop every stage runs: epochs of length-grouped batches (each rank takes
its slice of the global batch), one ``stage.train_step`` per batch, JSONL records every
``logging_steps``, ``stage.evaluate`` every ``eval_steps``, a checkpoint every ``save_steps``;
resuming restores the loop counters, optimizer and every RNG state. ``Callback``s installed with
``Trainer(..., callbacks=[...])`` see every step's end and the run's end."""
from __future__ import annotations

import time
from typing import Protocol

import torch

from .. import data as D
from ..errors import first_line
from . import checkpoint as C
from . import distributed as dd
from . import state as S
from .context import RunContext
from .optim import Optimizers
from .task import example_batch


class Callback:
    """Hooks into a run (tests, tools); every method is optional."""

    def on_step_end(self, stage: str, step: int) -> None:
        """After the optimizer step that made ``step`` steps of ``stage``, before its logging, evaluation and checkpoint."""

    def on_run_end(self, trainer) -> None:
        """After the last stage of a run that finished (``trainer``: the ``cofi.training.trainer.Trainer``)."""


class Stage(Protocol):
    name: str  # finetune | prune | compact (checkpoint stage)
    model: torch.nn.Module
    optim: Optimizers
    phase: str  # recorded in checkpoints

    def set_phase(self, step: int, force: bool = False) -> None: ...
    def train_step(self, batch: dict, step: int) -> dict: ...
    def evaluate(self, ls: S.LoopState) -> None: ...
    def state_extras(self) -> dict: ...


def save_checkpoint(ctx: RunContext, stage: Stage, ls: S.LoopState) -> None:
    rank_rng = S.rank_rng(ctx.dist, ctx.device)  # a collective: every rank
    if ctx.dist.main:
        config = ctx.folder.saved_config()
        st = S.build_state(stage.name, stage.phase, ls, config, stage.model, stage.optim.state_dict(), ctx.mask_gen,
                           stage.state_extras())
        st["rng_ranks"] = rank_rng
        C.save_checkpoint(ctx.folder.ckpt_dir, C.STAGES[stage.name], ls.step, st, keep=ctx.cfg.keep_checkpoints)
    dd.barrier(ctx.dist)


def restore(ctx: RunContext, stage: Stage, resume_state: dict) -> S.LoopState:
    """The loop state of a checkpoint, with the stage's phase, optimizer and every RNG restored."""
    ls = S.LoopState(**resume_state["loop"])
    stage.set_phase(ls.step, force=True)
    try:
        stage.optim.load_state_dict(resume_state["optim"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise C.CheckpointError(f"cofi: --resume: the checkpoint's optimizer state does not fit this run "
                                f"({type(e).__name__}: {first_line(e)})") from e
    C.set_rng_state(resume_state["rng"], ctx.mask_gen)
    S.set_rank_rng(resume_state, ctx.dist, ctx.device, ctx.log)
    return ls


def run_loop(ctx: RunContext, stage: Stage, *, bs: int, total: int, resume_state: dict | None) -> S.LoopState:
    """Runs ``stage`` to ``total`` steps (from a checkpoint's state, if given)."""
    cfg = ctx.cfg
    if resume_state is not None:
        ls = restore(ctx, stage, resume_state)
        ctx.metrics.truncate_after(C.STAGES[stage.name], ls.step)
    else:  # records of this stage are from an attempt that did not reach a checkpoint
        ls = S.LoopState()
        ctx.metrics.truncate_after(C.STAGES[stage.name] - 1, 2 ** 62)
    stage.model.train()
    pbar = None
    if cfg.progress and ctx.dist.main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, initial=ls.step, desc=stage.name, dynamic_ncols=True, mininterval=1.0)
    t0, s0 = time.perf_counter(), ls.step
    lengths = ctx.task.train.lengths
    if ls.step == 0 and resume_state is None and cfg.eval_steps and stage.name != "finetune":
        stage.evaluate(ls)
    while ls.step < total:
        batches = D.epoch_batches(lengths, bs, cfg.seed, ls.epoch, group_by_length=cfg.group_by_length)
        while ls.batch_in_epoch < len(batches) and ls.step < total:
            stage.set_phase(ls.step)
            mine, ctx.dist = dd.local_batch(batches[ls.batch_in_epoch], ctx.dist)
            batch = example_batch(ctx.task, mine, ctx.device)
            rec = stage.train_step(batch, ls.step)
            ls.step += 1
            ls.batch_in_epoch += 1
            for cb in ctx.callbacks:
                cb.on_step_end(stage.name, ls.step)
            rate = (ls.step - s0) / max(time.perf_counter() - t0, 1e-9)
            if ls.step % cfg.logging_steps == 0 or ls.step == total:
                rec = {k: (float(v) if torch.is_tensor(v) else v) for k, v in dd.mean_record(rec, ctx.dist).items()}
                rec.update(stage=stage.name, step=ls.step, epoch=ls.epoch + ls.batch_in_epoch / len(batches),
                           lr=stage.optim.lr, steps_per_s=rate)
                ctx.metrics.write(rec)
                if pbar is not None:
                    pbar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in rec.items()
                                      if k in ("loss", "expected_sparsity", "real_sparsity", "target_sparsity",
                                               "lambda_1", "lambda_2", "steps_per_s")}, refresh=False)
            if pbar is not None:
                pbar.update(1)
            if ls.step % cfg.eval_steps == 0 or ls.step == total:
                stage.evaluate(ls)
            if ls.step % cfg.save_steps == 0 or ls.step == total:
                save_checkpoint(ctx, stage, ls)
        if ls.batch_in_epoch >= len(batches):
            ls.epoch += 1
            ls.batch_in_epoch = 0
    if pbar is not None:
        pbar.close()
    return ls
