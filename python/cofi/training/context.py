"""What every stage of a run shares (``RunContext``) and how it is built from the config: the
task, the student, and for ``prune`` the teacher (and its output cache), the layer-distillation
projection, the mask set and its generator."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import data as D
from . import distributed as dd
from . import losses as LS
from .budget import make_maskset
from .config import ConfigError, TrainConfig
from .metrics_log import JsonlLog
from .modeling import load_model
from .precision import autocast
from .run_folder import RunFolder
from .state import current_shapes
from .task import Objective, TaskBundle, forward, load_task_bundle, uses_layer_distill
from .teacher_cache import TeacherCache, cache_bytes


@dataclass
class RunContext:
    cfg: TrainConfig
    command: str
    dist: dd.DistInfo
    device: torch.device
    folder: RunFolder
    metrics: JsonlLog
    task: TaskBundle
    metric_name: str
    student: torch.nn.Module
    objective: Objective  # the loss terms (and the teacher, with its output cache)
    proj: torch.nn.Module | None  # layer-distillation projection (prune with layer distillation)
    maskset: torch.nn.Module | None  # cofi.masks.MaskSet (prune)
    mask_gen: torch.Generator | None  # the mask sampling generator: identical on every rank (prune)
    log: Callable[[str], None]
    callbacks: tuple = ()

    def steps_per_epoch(self, bs: int) -> int:
        return D.num_batches(len(self.task.train), bs)

    def total_steps(self, max_steps: int | None, epochs: float, bs: int, at_least: int = 1) -> int:
        """A stage's step count: ``max_steps`` when set, else ``epochs`` of batches of ``bs``."""
        if max_steps is not None:
            return max_steps
        return max(at_least, math.ceil(epochs * self.steps_per_epoch(bs)))

    def shapes_of(self, stage: str | None) -> dict:
        """The tensor shapes a checkpoint of ``stage`` must have to load into this run's models."""
        return current_shapes(stage, self.student, self.maskset, self.proj)

    def student_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The student's trained parameters, with the layer-distillation projection's."""
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        if self.proj is not None:
            named += [("layer_transformation." + n, p) for n, p in self.proj.named_parameters()]
        return named


def seed_all(s: int) -> None:
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)


def load_for_task(path: str, task: TaskBundle, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    n = 1 if task.spec.kind == "regression" else task.spec.num_labels
    return load_model(path, qa=task.qa, num_labels=n, dropout=cfg.dropout, max_length=cfg.max_seq_length).to(device)


def build_context(cfg: TrainConfig, command: str, dist: dd.DistInfo, device: torch.device, folder: RunFolder,
                  log: Callable[[str], None], callbacks: tuple = ()) -> RunContext:
    """Loads the task and the models (the output folder is already claimed)."""
    metrics = JsonlLog(folder.out / "metrics.jsonl", dist.main)
    task = load_task_bundle(cfg, cfg.model)
    if len(task.train) == 0:
        raise ConfigError("cofi: the training set is empty")
    metric_name = cfg.metric_for_best or task.spec.primary
    if metric_name not in task.spec.metrics:
        raise ConfigError(f"cofi config: metric_for_best must be one of {task.spec.metrics} for task "
                          f"{task.spec.name!r}, got {metric_name!r}")
    seed_all(cfg.seed)  # identical init on every rank (classifier head, masks, projection)
    student = load_for_task(cfg.model, task, cfg, device)
    # saved with every model folder of the run: cofi eval reads the task's columns and labels back
    D.remember_task(student.config, task.spec, task.train.extra.get("label_map"), base_model=cfg.model)
    vocab = len(task.tokenizer)
    if student.config.vocab_size < vocab:
        raise ConfigError(f"cofi: tokenizer of {cfg.model} has {vocab} tokens but the model's vocab_size is "
                          f"{student.config.vocab_size}")
    teacher = proj = cache = maskset = mask_gen = None
    if command == "prune":
        if cfg.teacher is not None:
            teacher = load_for_task(cfg.teacher, task, cfg, device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            tv, sv = teacher.config.vocab_size, student.config.vocab_size
            if tv != sv:
                raise ConfigError(f"cofi: teacher/student vocab mismatch: teacher {cfg.teacher} has vocab_size {tv}, "
                                  f"student {cfg.model} has {sv}; they must share a tokenizer")
            if uses_layer_distill(cfg):
                proj = LS.identity_projection(student.config.hidden_size, teacher.config.hidden_size, device=device)
            cache = teacher_cache(cfg, task, teacher, device, log)
        maskset = make_maskset(cfg, student.config, device)  # target sparsity or target shape
        mask_gen = torch.Generator(device=device)
        mask_gen.manual_seed(cfg.seed + 7919)
    if cfg.freeze_embeddings:
        for n, p in student.named_parameters():
            if "embeddings" in n:
                p.requires_grad_(False)
    ctx = RunContext(cfg, command, dist, device, folder, metrics, task, metric_name, student,
                     Objective(cfg, task.spec, dist, teacher, cache), proj, maskset, mask_gen, log, tuple(callbacks))
    params = [p for _, p in ctx.student_named()] + (list(maskset.parameters()) if maskset is not None else [])
    dd.broadcast_params(params, dist)
    seed_all(cfg.seed + 1000 * dist.rank)  # dropout differs per rank, as in DDP
    return ctx


def teacher_cache(cfg: TrainConfig, task: TaskBundle, teacher: torch.nn.Module, device: torch.device,
                  log: Callable[[str], None]) -> TeacherCache | None:
    """``teacher_cache``: on = the teacher's outputs for every training example from one pass
    (teacher_cache.py); off = one teacher forward per step (the reference); auto = on unless the
    task is QA or the cache would exceed ``teacher_cache_max_gb``. The choice is logged."""
    tl = LS.default_teacher_layers(teacher.config.num_hidden_layers) if uses_layer_distill(cfg) else ()
    need = cache_bytes(task.train.lengths, len(tl), teacher.config.hidden_size, max(1, task.spec.num_labels))
    why = None
    if cfg.teacher_cache == "off":
        why = "teacher_cache=off"
    elif task.qa:
        why = "QA teachers have per-token logits"
    elif cfg.teacher_cache == "auto" and need > cfg.teacher_cache_max_gb * 2 ** 30:
        why = f"{need / 2 ** 30:.1f} GiB > teacher_cache_max_gb={cfg.teacher_cache_max_gb}"
    if why is not None:
        if cfg.teacher_cache == "on":
            raise ConfigError(f"cofi config: teacher_cache=on is impossible here: {why}")
        log(f"[teacher] one teacher forward per step ({why})")
        return None
    def fwd(model: torch.nn.Module, batch: dict, hidden: bool = False):
        with autocast(cfg.precision, device):
            return forward(model, batch, hidden=hidden)

    cache = TeacherCache.build(teacher, task.train, tl, cfg.eval_batch_size, device, fwd)
    log(f"[teacher] outputs of {len(task.train)} training examples cached in "
        f"{cache.build_s:.1f} s ({cache.nbytes / 2 ** 20:.0f} MiB, layers {list(tl)})")
    return cache
