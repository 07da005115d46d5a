"""Stage ``compact`` (stage 2 of ``cofi prune``): fold the pruning stage's masks into the student
(``cofi.pruning.prune``; ``best`` if an evaluation qualified, else ``final``) and fine-tune the
compact model with distillation; ``compact_folded`` (as folded) and ``compact`` (best) folders."""
from __future__ import annotations

from pathlib import Path

import torch

from . import artifacts as A
from ..errors import UserError
from . import checkpoint as C
from .context import RunContext
from .evaluate import best_note, describe, evaluate, metric_value
from .loop import run_loop
from .optim import Optimizers
from .precision import autocast
from .state import LoopState, check_train_state, plain, shapes
from .task import forward, logits_of
from ..runtime.hf_export import write_model_card


def load_pruned(ctx: RunContext) -> tuple[object, Path]:
    """The pruned masks (and their folder) to fold; the student takes that folder's weights.
    Raises UserError when the masks keep no hidden dimension (nothing to fine-tune)."""
    from safetensors.torch import load_file

    from ..masks import Masks

    src = A.pruned_source(ctx.folder.out)
    if (src / "model.safetensors").exists():
        ctx.student.load_state_dict(load_file(str(src / "model.safetensors")), strict=False)
    masks = Masks.from_state_dict(load_file(str(src / "masks.safetensors")))
    if masks.hidden is not None and not bool((masks.hidden != 0).any()):
        cfg = ctx.cfg
        raise UserError(f"cofi: the pruned masks in {src} keep no hidden dimension (target_sparsity "
                        f"{cfg.target_sparsity}, mask_groups {','.join(cfg.mask_groups)}): there is no "
                        "model to fine-tune; lower target_sparsity, add mask groups or pass --skip-compact true")
    if (src / "layer_transformation.safetensors").exists() and ctx.proj is not None:
        ctx.proj.load_state_dict(load_file(str(src / "layer_transformation.safetensors")))
    return masks, src


def fold(ctx: RunContext, masks, src: Path) -> torch.nn.Module:
    """The compact model of ``masks`` folded into the student (with the projection, if any)."""
    from ..pruning import prune

    proj = ctx.proj if (src / "layer_transformation.safetensors").exists() else None
    compact = prune(ctx.student, masks, layer_transformation=proj).to(ctx.device)
    ctx.log(f"[compact] folded {src}: {compact.num_encoder_params()} encoder params, sparsity "
            f"{compact.sparsity():.4f}; heads {compact.config.num_heads}; max |compact - masked| output "
            f"{fold_gap(ctx, masks, compact):.2e} on one evaluation batch (fp32)")
    if compact.num_encoder_params() == 0:
        ctx.log("[compact] warning: the pruned masks keep no encoder layer: the compact model is embeddings + "
                "task head only")
    if ctx.dist.main:
        compact.save_pretrained(str(ctx.folder.out / "compact_folded"), tokenizer=ctx.task.tokenizer)
    return compact


@torch.no_grad()
def fold_gap(ctx: RunContext, masks, compact: torch.nn.Module) -> float:
    """max |compact - masked| of the task outputs on the first evaluation batch, in fp32 without
    autocast whatever the run's precision (the fold must be exact: float rounding only)."""
    from .. import data as D

    enc = ctx.task.eval
    b = D.eval_batches(enc.lengths, ctx.cfg.eval_batch_size)[:1]
    if not b:
        return 0.0
    batch = {k: v.to(ctx.device) for k, v in enc.collate(b[0]).items()}
    was = ctx.student.training, compact.training
    ctx.student.eval()
    compact.eval()
    try:
        a = logits_of(forward(ctx.student, batch, masks.to(ctx.device), "compact"))
        c = logits_of(forward(compact, batch))
    finally:
        ctx.student.train(was[0])
        compact.train(was[1])
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, c))


class CompactStage:
    name = "compact"

    def __init__(self, ctx: RunContext, compact: torch.nn.Module, src: Path, prune_result: dict | None) -> None:
        cfg = ctx.cfg
        self.ctx, self.model, self.src, self.prune_result = ctx, compact, src, prune_result
        self.total = ctx.total_steps(cfg.compact_max_steps, cfg.compact_epochs, cfg.compact_batch_size, at_least=0)
        compact.train()
        self.phase = "compact"
        self.use_proj = ctx.objective.layer_distill and compact.layer_transformation is not None
        # as in the pruning stage, embeddings (tables + their LayerNorm) stay frozen
        named = [(n, p) for n, p in compact.named_parameters()
                 if p.requires_grad and not (cfg.freeze_embeddings and "embeddings" in n)]
        self.optim = Optimizers(named, cfg, lr=cfg.compact_learning_rate, kind=cfg.compact_scheduler,
                                total=max(self.total, 1))
        self.exists = torch.tensor([bool(a) or bool(f) for a, f in
                                    zip(compact.config.attention_present, compact.config.ffn_present)])
        self.out_dir = ctx.folder.out / "compact"

    def set_phase(self, step: int, force: bool = False) -> None:
        pass

    def state_extras(self) -> dict:
        return {"prune_result": plain(self.prune_result)}  # results.json needs it after a resume in stage 2

    def train_step(self, batch: dict, step: int) -> dict:
        ctx = self.ctx
        with autocast(ctx.cfg.precision, ctx.device):
            out = forward(self.model, batch, hidden=self.use_proj)
        terms = ctx.objective.terms(batch, out, self.exists, self.model.layer_transformation if self.use_proj else None)
        if ctx.objective.teacher is not None and not self.use_proj:
            terms.pop("layer_loss", None)
        loss = ctx.objective.combine(terms)
        self.optim.step(loss, ctx.dist)
        return {**{k: v.detach() for k, v in terms.items()}, "loss": loss.detach()}

    def evaluate(self, ls: LoopState) -> None:
        ctx = self.ctx
        m = evaluate(self.model, ctx.task, ctx.cfg, ctx.device)
        ctx.metrics.write({"stage": "compact", "step": ls.step, "eval": m, "real_sparsity": self.model.sparsity()})
        ls.last_eval = m
        v = metric_value(m, ctx.metric_name)
        if v is not None and (ls.best_metric is None or v > ls.best_metric):
            ls.best_metric, ls.best_step = v, ls.step
            if ctx.dist.main:
                self.model.save_pretrained(str(self.out_dir), tokenizer=ctx.task.tokenizer)
                write_model_card(self.out_dir, self.model.config, accuracy={"dev (selection split)": m})
        ctx.log(f"[compact] step {ls.step}: {describe(m, ctx.metric_name)}" + best_note(ls))

    def run(self, st: dict | None) -> dict:
        """Fine-tunes the compact model (from a compact-stage checkpoint, if given); its summary."""
        ctx, cfg = self.ctx, self.ctx.cfg
        if st is not None:
            why = check_train_state(st, {"model": shapes(self.model.state_dict())})
            if why is not None:
                raise C.CheckpointError(f"cofi: --resume: the compact-stage checkpoint does not fit the model folded "
                                        f"from {self.src}: {why}")
            self.model.load_state_dict(st["model"])
        if self.total > 0:
            ls = run_loop(ctx, self, bs=cfg.compact_batch_size, total=self.total, resume_state=st)
        else:
            ls = LoopState()
            ctx.metrics.truncate_after(C.STAGES["compact"] - 1, 2 ** 62)
            self.evaluate(ls)
        return {"best_metric": ls.best_metric, "best_step": ls.best_step, "steps": ls.step,
                "sparsity": self.model.sparsity(), "encoder_params": self.model.num_encoder_params(),
                "dir": str(self.out_dir)}
