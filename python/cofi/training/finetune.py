"""Stage ``finetune`` (``cofi finetune``): the teacher, fine-tuned with cross-entropy on the labels;
``best`` (by the eval metric) and ``final`` model folders, ``results.json``."""
from __future__ import annotations


from . import artifacts as A
from . import distributed as dd
from .context import RunContext
from .evaluate import best_note, describe, evaluate, metric_value
from .loop import run_loop
from .optim import Optimizers
from .precision import autocast, outputs_fp32
from .state import LoopState
from .task import forward, task_loss


class FinetuneStage:
    name = "finetune"

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.model = ctx.student
        self.total = ctx.total_steps(cfg.max_steps, cfg.epochs, cfg.batch_size)
        self.phase = "train"
        self.optim = Optimizers(ctx.student_named(), cfg, lr=cfg.learning_rate, kind=cfg.scheduler, total=self.total)
        self.best_dir = ctx.folder.out / "best"

    def set_phase(self, step: int, force: bool = False) -> None:
        pass

    def state_extras(self) -> dict:
        return {}

    def train_step(self, batch: dict, step: int) -> dict:
        with autocast(self.ctx.cfg.precision, self.ctx.device):
            out = forward(self.model, batch)
        loss = task_loss(self.ctx.task.spec, outputs_fp32(out), batch["labels"])
        self.optim.step(loss, self.ctx.dist)
        return {"loss": loss.detach()}

    def evaluate(self, ls: LoopState) -> None:
        ctx = self.ctx
        m = evaluate(self.model, ctx.task, ctx.cfg, ctx.device)
        ctx.metrics.write({"stage": "finetune", "step": ls.step, "eval": m})
        ls.last_eval = m
        v = metric_value(m, ctx.metric_name)
        if v is not None and (ls.best_metric is None or v > ls.best_metric):
            ls.best_metric, ls.best_step = v, ls.step
            if ctx.dist.main:
                A.save_model(self.best_dir, self.model, ctx.task.tokenizer)
        ctx.log(f"[finetune] step {ls.step}: {describe(m, ctx.metric_name)}" + best_note(ls))

    def run(self, st: dict | None) -> dict:
        ctx = self.ctx
        if st is not None:
            self.model.load_state_dict(st["model"])
        ls = run_loop(ctx, self, bs=ctx.cfg.batch_size, total=self.total, resume_state=st)
        if ctx.dist.main:
            A.save_model(ctx.folder.out / "final", self.model, ctx.task.tokenizer)
            A.write_results(ctx.folder.out, {"best_metric": ls.best_metric, "best_step": ls.best_step,
                                             "metric": ctx.metric_name, "last_eval": ls.last_eval, "steps": ls.step,
                                             "best_dir": str(self.best_dir)})
        dd.barrier(ctx.dist)
        return {"best_metric": ls.best_metric, "best_dir": str(self.best_dir), "steps": ls.step,
                "last_eval": ls.last_eval}
