"""Stage ``prune`` (``cofi prune``, stage 1): pre-pruning distillation for ``prepruning_steps`` /
``prepruning_epochs``, then masks + Lagrangian + distillation with the budget (target sparsity, or
per-group targets of a target shape) ramped linearly over the Lagrangian warm-up.

A pruning step (docs/cofi-reference.md 2.4, docs/design.md 4): sample ONE mask set with the fused
``MaskSet.step`` (shared generator, so every rank draws the same) -> student forward (``backend``
compact or dense) -> teacher forward or cache lookup (no grad) -> loss = a_pred KL_T * T^2 +
a_layer L_layer (+ a_ce CE) + L_c (from the same fused step's keep probabilities and expected
sparsity) -> ``Optimizers.step``. Before the run the budget is reported (budget.py: parameters,
measured latency; ``budget.json``). Once the warm-up is over every evaluation uses the masks the
run would deliver (``budget.delivered_masks``: the deterministic masks when their real sparsity is
within ``sparsity_epsilon`` of the target, else the scores projected onto the budget; exactly the
target shape in target-architecture mode). ``best``: the best of those; ``final``: the delivered
masks of the last scores. Either meets the budget."""
from __future__ import annotations

import json
from typing import Any

import torch

from . import artifacts as A
from . import checkpoint as C
from . import distributed as dd
from .budget import budget_lines, delivered_masks, describe_budget
from ..masks.sparsity import structure_summary
from .config import ConfigError
from .context import RunContext
from .evaluate import best_note, describe, evaluate, metric_value
from .loop import run_loop
from .optim import Optimizers, controller_lr
from .precision import autocast
from .state import LoopState
from .task import forward


class PruneStage:
    name = "prune"

    def __init__(self, ctx: RunContext) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.model = ctx.student
        self.maskset = ctx.maskset
        spe = ctx.steps_per_epoch(cfg.batch_size)
        self.total = ctx.total_steps(cfg.max_steps, cfg.epochs, cfg.batch_size)
        self.pre_steps = cfg.prepruning_steps if cfg.prepruning_steps is not None else int(round(cfg.prepruning_epochs * spe))
        self.warmup_steps = (cfg.lagrangian_warmup_steps if cfg.lagrangian_warmup_steps is not None
                             else int(round(cfg.lagrangian_warmup_epochs * spe)))
        if self.pre_steps >= self.total:
            raise ConfigError(f"cofi config: pre-pruning ({self.pre_steps} steps) leaves no pruning steps of "
                              f"{self.total}; lower prepruning_epochs/prepruning_steps or raise epochs/max_steps")
        self.budget = describe_budget(cfg, self.model, self.maskset, ctx.device)
        self.target = self.budget["target_sparsity"]  # of the target shape in target-architecture mode
        ctx.log(f"[prune] {len(ctx.task.train)} examples, {spe} steps/epoch, {self.total} steps: {self.pre_steps} "
                f"pre-pruning, Lagrangian warm-up {self.warmup_steps}, target {self.target:.4f}, backend {cfg.backend}")
        for line in budget_lines(self.budget):
            ctx.log(line)
        horizon = self.warmup_steps if self.warmup_steps > 0 else self.total - self.pre_steps
        self.reg_lr, self.controller = controller_lr(cfg, self.maskset.cfg.score_travel, horizon)
        c = self.controller
        if c["adapted"]:
            ctx.log(f"[prune] controller: reg_learning_rate {c['configured']:g} -> {c['effective']:.4g}: log_alpha may "
                    f"have to travel {c['travel']:.2f}, about {c['configured']:g} per step, which takes "
                    f"{c['travel'] / c['configured']:.0f} steps, more than a third of the {horizon}-step warm-up; raised "
                    f"so that it takes a third (--reg-learning-rate keeps the rate given)")
        else:
            ctx.log(f"[prune] controller: reg_learning_rate {c['effective']:g} (as configured)")
        if ctx.dist.main:
            C.atomic_write_bytes(ctx.folder.out / "budget.json", json.dumps(self.budget, indent=2).encode())
        self.best_dir = ctx.folder.out / "best"
        self.phase = "pre" if self.pre_steps > 0 else "pruning"
        self.optim = self._optimizers(self.phase)

    def _optimizers(self, phase: str) -> Optimizers:
        """The reference starts a fresh model optimizer + schedule (over the remaining steps) when pruning starts."""
        cfg = self.ctx.cfg
        pruning = phase == "pruning"
        return Optimizers(self.ctx.student_named(), cfg, lr=cfg.learning_rate, kind=cfg.scheduler,
                          total=self.total - self.pre_steps if pruning else self.total,
                          maskset=self.maskset if pruning else None, reg_lr=self.reg_lr)

    def set_phase(self, step: int, force: bool = False) -> None:
        want = "pre" if step < self.pre_steps else "pruning"
        if want != self.phase or force:
            self.phase = want
            self.optim = self._optimizers(want)
            if want == "pruning" and not force:
                self.ctx.log(f"[prune] step {step}: pre-pruning distillation done; masks on")

    def progress(self, step: int) -> float:
        """Warm-up progress at ``step``: 0 before pruning, rising linearly to 1 over the warm-up."""
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, max(0, step - self.pre_steps) / self.warmup_steps)

    def target_at(self, step: int) -> float:
        """The target sparsity at ``step`` (the Lagrangian's in target-sparsity mode; in
        target-architecture mode each group's target ramps the same way)."""
        return self.target * self.progress(step)

    def state_extras(self) -> dict:
        st = {"maskset": self.maskset.state_dict()}
        if self.ctx.proj is not None:
            st["proj"] = self.ctx.proj.state_dict()
        return st

    def train_step(self, batch: dict, step: int) -> dict[str, Any]:
        """One training step at loop step ``step`` (its record: losses, and while pruning the
        target / expected sparsity and the lambdas, as tensors)."""
        ctx, ms = self.ctx, self.maskset
        pruning = self.phase == "pruning"
        mstep = ms.step(generator=ctx.mask_gen) if pruning else None
        masks = mstep.z if pruning else None
        with autocast(ctx.cfg.precision, ctx.device):  # the masks and the Lagrangian stay outside: fp32
            out = forward(self.model, batch, masks, ctx.cfg.backend, hidden=ctx.objective.layer_distill)
        exists = None
        if masks is not None and (masks.mha is not None or masks.ffn is not None):
            L = self.model.config.num_hidden_layers
            mha = masks.mha.detach() if masks.mha is not None else torch.zeros(L)
            ffn = masks.ffn.detach() if masks.ffn is not None else torch.zeros(L)
            exists = ((mha != 0) | (ffn != 0)).cpu()
        terms = ctx.objective.terms(batch, out, exists, ctx.proj)
        rec: dict[str, Any] = {}
        if pruning:
            t = self.target_at(step)
            if ms.target is None:
                terms["lagrangian"], exp_s = ms.lagrangian(t, step=mstep)
            else:
                terms["lagrangian"], exp_s = ms.lagrangian(progress=self.progress(step), step=mstep)
            rec.update(target_sparsity=t, expected_sparsity=exp_s.detach(), lambda_1=ms.lambda_1.detach().sum(),
                       lambda_2=ms.lambda_2.detach().sum())
        loss = ctx.objective.combine(terms)
        self.optim.step(loss, ctx.dist)
        rec.update({k: v.detach() for k, v in terms.items()}, loss=loss.detach(), phase=self.phase)
        if pruning and (step + 1) % ctx.cfg.logging_steps == 0:
            rec["real_sparsity"] = ms.real_sparsity(ms.deterministic(ctx.cfg.deterministic_mode), count="encoder")
        return rec

    def evaluate(self, ls: LoopState) -> None:
        """Evaluates the masks of this step: before pruning none, during the warm-up the
        deterministic ones, after it the delivered ones (the only ones that can be ``best``).
        ``real_sparsity``: of the evaluated masks, counted as the folded model counts."""
        ctx, cfg, ms = self.ctx, self.ctx.cfg, self.maskset
        pruning = ls.step >= self.pre_steps and ls.step > 0 or self.pre_steps == 0
        ramped = pruning and self.progress(ls.step) >= 1.0
        info: dict = {}
        if ramped:
            masks, info = delivered_masks(ms, cfg)
        else:
            masks = ms.deterministic(cfg.deterministic_mode) if pruning else None
        m = evaluate(self.model, ctx.task, cfg, ctx.device, masks)
        _, exp_s = ms.expected_sparsity()
        real = ms.real_sparsity(masks, count="encoder") if masks is not None else 0.0
        rec = {"stage": "prune", "step": ls.step, "eval": m, "real_sparsity": real,
               "expected_sparsity": float(exp_s.detach()), "target_sparsity": self.target_at(ls.step) if pruning else 0.0,
               "lambda_1": float(ms.lambda_1.detach().sum()), "lambda_2": float(ms.lambda_2.detach().sum())}
        if info:
            rec.update(masks=info["masks"], deterministic_sparsity=info["sparsity_before"])
        if masks is not None:
            rec["structure"] = structure_summary(masks, ms.cfg)
        ctx.metrics.write(rec)
        ls.last_eval = {**m, "real_sparsity": real}
        v = metric_value(m, ctx.metric_name)
        if ramped and v is not None and (ls.best_metric is None or v > ls.best_metric):
            ls.best_metric, ls.best_step, ls.best_sparsity = v, ls.step, real
            if ctx.dist.main:
                self.save(self.best_dir, masks, {**m, "real_sparsity": real, "step": ls.step, "delivered": info})
        note = f" ({info['masks']}; deterministic {info['sparsity_before']:.4f})" if info else ""
        ctx.log(f"[prune] step {ls.step}: {describe(m, ctx.metric_name)}, real sparsity {real:.4f}{note}, expected "
                f"{float(exp_s.detach()):.4f}" + best_note(ls))

    def _recount(self, src) -> dict:
        """The delivered record of a pruned folder's masks (sparsity and structure only)."""
        from safetensors.torch import load_file

        from ..masks import Masks

        masks = Masks.from_state_dict(load_file(str(src / "masks.safetensors")))
        real = self.maskset.real_sparsity(masks, count="encoder")
        return {"masks": "as saved", "sparsity_before": real, "real_sparsity": real,
                "structure": structure_summary(masks, self.maskset.cfg)}

    def save(self, d, masks, metrics: dict) -> None:
        ctx = self.ctx
        A.save_pruned(d, self.model, ctx.task.tokenizer, masks, self.maskset, ctx.proj, metrics)

    def run(self, st: dict | None) -> dict:
        """Runs the stage (from a prune-stage checkpoint, if given); saves ``final``; the pruning summary."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if st is not None:
            self.model.load_state_dict(st["model"])
            self.maskset.load_state_dict(st["maskset"])
            if ctx.proj is not None:
                ctx.proj.load_state_dict(st["proj"])
        ls = run_loop(ctx, self, bs=cfg.batch_size, total=self.total, resume_state=st)
        masks, info = delivered_masks(self.maskset, cfg)
        if ctx.dist.main:
            self.save(ctx.folder.out / "final", masks, {**ls.last_eval, "step": ls.step, "delivered": info})
        dd.barrier(ctx.dist)
        src = A.pruned_source(ctx.folder.out)
        if src.name == "best":  # a best folder saved before delivered masks existed has no record: recount
            info = json.loads((src / "metrics.json").read_text()).get("delivered") or self._recount(src)
        how = {"converged": f"the deterministic masks are within {cfg.sparsity_epsilon} of the target",
               "projected": "the learned scores were projected onto the budget (closest from below)",
               "shape": "exactly the target shape"}.get(info["masks"], info["masks"])
        ctx.log(f"[prune] delivered: the {src.name} masks ({'best evaluation' if src.name == 'best' else 'last step'}): "
                f"{how}; real sparsity {info['real_sparsity']:.4f} (target {self.target:.4f}; deterministic masks "
                f"{info['sparsity_before']:.4f}); structure {info['structure']}")
        return {"best_metric": ls.best_metric, "best_step": ls.best_step, "best_sparsity": ls.best_sparsity,
                "last_eval": ls.last_eval, "steps": ls.step, "target_sparsity": self.target, "controller": self.controller,
                "delivered": {"source": src.name, **info}}
