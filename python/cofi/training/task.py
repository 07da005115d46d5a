"""The task side of training: the task bundle (tokenizer + encoded train/eval sets), the model
forward, and the losses a step combines (task loss, prediction and layer distillation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import data as D
from . import distributed as dd
from . import losses as LS
from .config import TrainConfig
from .precision import autocast, outputs_fp32
from .teacher_cache import TeacherCache


@dataclass
class TaskBundle:
    spec: D.TaskSpec
    tokenizer: Any
    train: D.Encoded
    eval: D.Encoded
    eval_qa: D.Encoded | None = None  # QA eval features (with offsets)

    @property
    def qa(self) -> bool:
        return self.spec.kind == "qa"


def load_task_bundle(cfg: TrainConfig, tokenizer_path: str) -> TaskBundle:
    spec = D.get_spec(cfg.task, text_fields=cfg.text_fields, label_field=cfg.label_field, num_labels=cfg.num_labels)
    tok = D.load_tokenizer(tokenizer_path, tokenizer=cfg.tokenizer)
    train, ev = D.load_task(spec, train_file=cfg.train_file, eval_file=cfg.eval_file, eval_split=cfg.eval_split)
    if cfg.max_train_samples:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        ev = ev.select(range(min(cfg.max_eval_samples, len(ev))))
    if spec.kind == "qa":
        tr = D.encode_qa(train, tok, cfg.max_seq_length, cfg.doc_stride, train=True)
        evq = D.encode_qa(ev, tok, cfg.max_seq_length, cfg.doc_stride, train=False)
        return TaskBundle(spec, tok, tr, evq, evq)
    tr = D.encode_classification(spec, train, tok, cfg.max_seq_length)
    evd = D.encode_classification(spec, ev, tok, cfg.max_seq_length, label_map=tr.extra.get("label_map"))
    return TaskBundle(spec, tok, tr, evd)


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], masks=None, backend: str | None = None,
            hidden: bool = False):
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if masks is not None:
        kw["masks"] = masks
        kw["backend"] = backend or "compact"
    return model(**kw, output_hidden_states=hidden)


def logits_of(out) -> list[torch.Tensor]:
    if getattr(out, "logits", None) is not None:
        return [out.logits]
    return [out.start_logits, out.end_logits]


def task_loss(spec: D.TaskSpec, out, labels: torch.Tensor) -> torch.Tensor:
    if spec.kind == "qa":
        s, e = out.start_logits, out.end_logits
        return 0.5 * (F.cross_entropy(s, labels[:, 0]) + F.cross_entropy(e, labels[:, 1]))
    if spec.kind == "regression":
        return F.mse_loss(out.logits.squeeze(-1), labels.float())
    return F.cross_entropy(out.logits, labels)


def pred_distill_loss(spec: D.TaskSpec, out, t_out, temperature: float) -> torch.Tensor:
    s_l, t_l = logits_of(out), logits_of(t_out)
    if spec.kind == "regression":
        return F.mse_loss(s_l[0], t_l[0])
    if spec.kind == "qa":
        return LS.qa_prediction_distill_loss(s_l[0], s_l[1], t_l[0], t_l[1], temperature)
    return LS.prediction_distill_loss(s_l[0], t_l[0], temperature)


def uses_layer_distill(cfg: TrainConfig) -> bool:
    return cfg.teacher is not None and cfg.layer_distill != "none" and cfg.distill_layer_alpha > 0


class Objective:
    """A step's loss terms and their weighted sum: cross-entropy on labels without a teacher;
    with one, prediction distillation (a_pred), layer distillation (a_layer) and, if a_ce > 0,
    cross-entropy; the Lagrangian (weight 1) is added by the pruning stage. The terms are computed in
    fp32 outside autocast from the student's outputs cast to fp32; a per-step teacher forward runs
    under the run's autocast (``precision.py``)."""

    def __init__(self, cfg: TrainConfig, spec: D.TaskSpec, dist: dd.DistInfo, teacher: torch.nn.Module | None = None,
                 teacher_cache: TeacherCache | None = None) -> None:
        self.cfg, self.spec, self.dist = cfg, spec, dist
        self.teacher, self.teacher_cache = teacher, teacher_cache
        self.layer_distill = uses_layer_distill(cfg)
        self.teacher_layers: tuple[int, ...] = LS.default_teacher_layers(teacher.config.num_hidden_layers) \
            if teacher is not None and self.layer_distill else ()
        self.weights = {"pred_loss": cfg.distill_pred_alpha, "layer_loss": cfg.distill_layer_alpha,
                        "ce_loss": cfg.ce_alpha, "lagrangian": 1.0}

    def terms(self, batch: dict, out, layer_exists: torch.Tensor | None = None,
              proj: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        out = outputs_fp32(out)
        if self.teacher is None:
            return {"ce_loss": task_loss(self.spec, out, batch["labels"])}
        return self.distill_terms(batch, out, layer_exists, proj)

    def distill_terms(self, batch: dict, out, layer_exists: torch.Tensor | None,
                      proj: torch.nn.Module | None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if self.teacher_cache is not None:
            t_out = self.teacher_cache.lookup(batch["example_index"], batch["attention_mask"])
        else:
            with torch.no_grad(), autocast(cfg.precision, batch["input_ids"].device):
                t_out = forward(self.teacher, batch, hidden=self.layer_distill)
            t_out = outputs_fp32(t_out)
        if cfg.distill_pred_alpha > 0:
            terms["pred_loss"] = pred_distill_loss(self.spec, out, t_out, cfg.distill_temp)
        if self.layer_distill:
            alive = None if layer_exists is None else [bool(a) for a in layer_exists]
            # data parallel: match layers on the GLOBAL batch (loss matrix averaged over ranks)
            reduce = None if self.dist.world == 1 else (lambda lm: dd.all_reduce_mean_(lm, self.dist))
            terms["layer_loss"], _ = LS.layer_distill_loss(
                list(out.hidden_states), list(t_out.hidden_states), proj, teacher_layers=self.teacher_layers,
                version=cfg.layer_distill, student_index=getattr(out, "hidden_index", None), alive=alive,
                token_mask=batch.get("attention_mask"), reduce_matrix=reduce)
        if cfg.ce_alpha > 0:
            terms["ce_loss"] = task_loss(self.spec, out, batch["labels"])
        return terms

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * v for k, v in terms.items())


def example_batch(task: TaskBundle, index, device: torch.device) -> dict:
    """The training batch of examples ``index`` on ``device`` (``example_index`` for the teacher cache)."""
    batch = {k: v.to(device) for k, v in task.train.collate(index).items()}
    batch["example_index"] = index
    return batch
