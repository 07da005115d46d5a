"""Optimizers of a training stage: the model's AdamW (weight-decay groups; fused where available)
with its learning-rate schedule, and while masks are trained the log_alpha AdamW and the lambdas'
AdamW (gradient ascent), stepped together by ``Optimizers.step`` (with precision fp16, through a
loss scaler: ``precision.grad_scaler``). ``controller_lr``: the rate of the log_alpha and lambda AdamWs
for a schedule (docs/design.md 4, "A controller for any schedule length")."""
from __future__ import annotations

import torch

from . import distributed as dd
from .config import TrainConfig
from .precision import grad_scaler, no_autocast


# The scores must be able to cross their whole travel (MaskConfig.score_travel) in 1 / CROSSINGS of
# the Lagrangian warm-up. AdamW moves a score by at most about its learning rate per step, so the
# rate needed is CROSSINGS * travel / warm-up steps. 3 keeps the demo preset (reg lr 0.1 over its
# ~319-step warm-up: 32 units of travel per warm-up, 27.6 needed) as configured.
CROSSINGS = 3


def controller_lr(cfg: TrainConfig, travel: float, horizon: int) -> tuple[float, dict]:
    """The learning rate of log_alpha and of the lambdas for a warm-up of ``horizon`` steps.

    ``cfg.reg_learning_rate`` unless it is too slow for the scores to cross ``travel`` (log_alpha
    units) in ``horizon / CROSSINGS`` steps and ``cfg.reg_learning_rate_adapt`` is on; then
    ``CROSSINGS * travel / horizon``. Returns (rate, record: configured, effective, adapted,
    needed, horizon_steps, travel)."""
    need = CROSSINGS * travel / horizon if horizon > 0 else 0.0
    adapted = bool(cfg.reg_learning_rate_adapt and cfg.reg_learning_rate < need)
    lr = need if adapted else cfg.reg_learning_rate
    return lr, {"configured": cfg.reg_learning_rate, "effective": lr, "adapted": adapted, "needed": need,
                "horizon_steps": horizon, "travel": travel}


def no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm.weight" in name or "ln_weight" in name or "layer_norm" in name.lower()


def weight_decay_groups(named: list[tuple[str, torch.nn.Parameter]], wd: float) -> list[dict]:
    decay = [p for n, p in named if not no_decay(n)]
    no = [p for n, p in named if no_decay(n)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": wd})
    if no:
        groups.append({"params": no, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


def schedule(opt: torch.optim.Optimizer, kind: str, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then constant or linear decay to 0 at ``total``."""
    total = max(total, 1)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class Optimizers:
    """The model AdamW + schedule over ``named``; with ``maskset`` (masks trained) also the
    log_alpha and lambda AdamWs at ``reg_lr`` (default ``cfg.reg_learning_rate``)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, *, lr: float, kind: str,
                 total: int, maskset=None, reg_lr: float | None = None) -> None:
        self.cfg = cfg
        self.model_params = [p for _, p in named]
        self.opt = adamw(weight_decay_groups(named, cfg.weight_decay), lr, cfg)
        self.sched = schedule(self.opt, kind, total, cfg.warmup_steps)
        self.maskset = maskset
        self.l0_opt = self.lam_opt = None
        self.params = list(self.model_params)  # every parameter whose gradient is averaged over ranks
        if maskset is not None:
            reg_lr = cfg.reg_learning_rate if reg_lr is None else reg_lr
            self.l0_opt = torch.optim.AdamW([maskset.log_alpha], lr=reg_lr, weight_decay=0.0)
            self.lam_opt = torch.optim.AdamW([maskset.lambda_1, maskset.lambda_2], lr=reg_lr, weight_decay=0.0)
            self.params += [maskset.log_alpha, maskset.lambda_1, maskset.lambda_2]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.scaler = grad_scaler(cfg.precision, self.device)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def step(self, loss: torch.Tensor, dist: dd.DistInfo) -> None:
        """backward -> average gradients over ranks -> clip model grads -> model AdamW -> log_alpha
        AdamW -> lambdas AdamW on negated gradients -> scheduler -> clamp log_alpha -> zero grads.
        Autocast is off throughout. fp16: the loss is scaled for backward, the gradients unscaled
        before clipping, and a step whose gradients are not finite is skipped by every optimizer
        (the scaler then lowers its scale)."""
        with no_autocast(self.device):
            self._step(loss, dist)

    def _step(self, loss: torch.Tensor, dist: dd.DistInfo) -> None:
        sc = self.scaler
        (sc.scale(loss) if sc is not None else loss).backward()
        # A compact step gives no gradient to the weights of units it cut out; dense mode (the
        # reference) gives them zeros, on which AdamW still moves them (momentum, weight decay).
        # Zeros here make both modes, and one process vs data parallel, take the same step.
        for p in self.model_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dd.average_grads(self.params, dist)
        opts = [o for o in (self.opt, self.l0_opt, self.lam_opt) if o is not None]
        if sc is not None:
            for o in opts:
                sc.unscale_(o)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model_params, self.cfg.max_grad_norm)
        if self.maskset is not None:
            self.maskset.ascend_lambdas_()
        for o in opts:
            sc.step(o) if sc is not None else o.step()
        if sc is not None:
            sc.update()
        self.sched.step()
        if self.maskset is not None:
            self.maskset.clamp_()
        self.opt.zero_grad(set_to_none=True)
        if self.maskset is not None:
            self.l0_opt.zero_grad(set_to_none=True)
            self.lam_opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        st = {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        if self.maskset is not None:
            st["l0_opt"] = self.l0_opt.state_dict()
            st["lam_opt"] = self.lam_opt.state_dict()
        if self.scaler is not None:
            st["scaler"] = self.scaler.state_dict()
        return st

    def load_state_dict(self, st: dict) -> None:
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.maskset is not None:
            self.l0_opt.load_state_dict(st["l0_opt"])
            self.lam_opt.load_state_dict(st["lam_opt"])
        if self.scaler is not None:
            self.scaler.load_state_dict(st["scaler"])
