"""The CoFi training loop: teacher fine-tuning, pruning with distillation + Lagrangian, compact
fine-tuning (stage 2); checkpoint/resume, periodic evaluation, JSONL metrics, progress bar, DDP.

Stages (checkpoint stage index): 0 ``finetune`` (CE on labels), 1 ``prune`` (pre-pruning
distillation for ``prepruning_steps``/``prepruning_epochs``, then masks + Lagrangian +
distillation with the target ramped linearly over the Lagrangian warm-up), 2 ``compact``
(fold the best masks with ``cofi.pruning.prune`` and fine-tune the compact model with distillation).

Per pruning step (cofi-reference.md 2.4, design.md 4): sample ONE mask set (shared generator, so
every rank draws the same) -> student forward (``backend`` compact or dense) -> teacher forward (no
grad) -> loss = a_pred KL_T * T^2 + a_layer L_layer (+ a_ce CE) + L_c -> backward -> average
gradients over ranks -> clip model grads -> model AdamW (fused where available; linear decay;
embeddings frozen) -> log_alpha AdamW (reg lr) -> lambdas AdamW on negated gradients (explicit
ascent) -> scheduler -> clamp log_alpha -> zero grads.

Output folder: locked for the run (``.cofi.lock``, flock by rank 0); a folder holding anything is
refused unless ``--resume`` (continue the run in it) or ``--overwrite`` (delete what a cofi run
wrote there first). ``--resume`` takes the newest checkpoint that verifies, loads as plain data
and fits this run; one of another configuration (in a key that changes results) or command is
refused. A resumed run is bitwise the uninterrupted one: checkpoints hold every rank's RNG
states, and metrics.jsonl is cut back to the steps the checkpoint reached.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .. import data as D
from . import checkpoint as C
from . import distributed as dd
from . import losses as LS
from ..errors import UserError
from .config import ConfigError, TrainConfig, upgrade_saved_config
from .modeling import load_model
from .teacher_cache import TeacherCache, cache_bytes

STAGES = C.STAGES
LOCK = ".cofi.lock"
# What a run writes in its output folder (``--overwrite`` deletes these and nothing else).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "results.json", "checkpoints", "best", "final", "compact",
               "compact_folded")
# Config keys that do not change what a run computes: they may differ on --resume.
RESUME_FREE = frozenset({"output_dir", "progress", "num_threads", "device", "keep_checkpoints", "save_steps",
                         "logging_steps", "skip_compact", "overwrite"})
# Test hook: COFI_TEST_KILL_AT=<stage>:<step> SIGKILLs the process right after that step.
_KILL_AT = (lambda v: (v.split(":")[0], int(v.split(":")[1])) if v else None)(os.environ.get("COFI_TEST_KILL_AT"))


# ---------------------------------------------------------------------- task bundle
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


# ---------------------------------------------------------------------- helpers
def _is_masked_model(model: torch.nn.Module) -> bool:
    return not hasattr(model, "layers") or hasattr(model, "bert") or hasattr(model, "roberta")


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


def _wd_groups(named: list[tuple[str, torch.nn.Parameter]], wd: float) -> list[dict]:
    def no_decay(n: str) -> bool:
        return n.endswith("bias") or "LayerNorm.weight" in n or "ln_weight" in n or "layer_norm" in n.lower()

    decay = [p for n, p in named if not no_decay(n)]
    no = [p for n, p in named if no_decay(n)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": wd})
    if no:
        groups.append({"params": no, "weight_decay": 0.0})
    return groups


def _adamw(groups: list[dict], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    kw = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kw)


def _schedule(opt: torch.optim.Optimizer, kind: str, total: int, warmup: int):
    total = max(total, 1)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


class JsonlLog:
    """Append-only JSONL metrics log; on resume, records after the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, stage: int, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            if (STAGES.get(r.get("stage"), -1), r.get("step", 0)) <= (stage, step):
                keep.append(line)
        C.atomic_write_bytes(self.path, ("\n".join(keep) + ("\n" if keep else "")).encode())

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------- the trainer
@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_sparsity: float | None = None
    last_eval: dict = field(default_factory=dict)


def _plain(x: Any) -> Any:
    """``x`` with numpy scalars/arrays turned into Python numbers/lists (checkpoints hold plain data)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _plain_data(x: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if x is None or type(x) in (bool, int, float, str):
        return True
    if isinstance(x, (list, tuple)):
        return all(_plain_data(v, depth + 1) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain_data(v, depth + 1) for k, v in x.items())
    return False


_LOOP_TYPES = {"step": (int,), "epoch": (int,), "batch_in_epoch": (int,), "best_metric": (float, int, type(None)),
               "best_step": (int, type(None)), "best_sparsity": (float, int, type(None)), "last_eval": (dict,)}


def check_train_state(st: dict, shapes: dict[str, dict[str, tuple[int, ...]]] | None = None) -> str | None:
    """Why ``st`` is not a trainer checkpoint state (None = it is): keys, types, and, for the
    parts named in ``shapes``, the tensor names and shapes the current models have."""
    if not isinstance(st.get("phase"), str):
        return "phase is missing or not a string"
    loop = st.get("loop")
    if not isinstance(loop, dict) or set(loop) != set(_LOOP_TYPES):
        return f"loop must have the keys {sorted(_LOOP_TYPES)}"
    for k, types in _LOOP_TYPES.items():
        if type(loop[k]) not in types or (types[0] is int and isinstance(loop[k], int) and loop[k] < 0):
            return f"loop.{k} = {loop[k]!r} is not a valid {types[0].__name__}"
    if not _plain_data(loop["last_eval"]):
        return "loop.last_eval is not plain data"
    if not isinstance(st.get("config"), dict) or not _plain_data(st["config"]):
        return "config is missing or not plain data"
    for k in ("model", "maskset", "proj"):
        if k in st or k == "model":
            why = C.tensor_dict_problem(st.get(k), k)
            if why is not None:
                return why
    optim = st.get("optim")
    if not isinstance(optim, dict) or not all(isinstance(optim.get(k), dict) for k in ("opt", "sched")):
        return "optim must hold the opt and sched state dicts"
    rr = st.get("rng_ranks")
    if rr is not None:
        lists = list(rr.values()) if isinstance(rr, dict) and "torch" in rr and set(rr) <= {"torch", "cuda"} else []
        if not lists or not all(isinstance(v, list) and len(v) == len(lists[0]) > 0 and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in v) for v in lists):
            return "rng_ranks must hold lists of uint8 generator states, one per rank"
    if "prune_result" in st and not (st["prune_result"] is None or (isinstance(st["prune_result"], dict)
                                                                    and _plain_data(st["prune_result"]))):
        return "prune_result is not plain data"
    for part, want in (shapes or {}).items():
        if part not in st:
            return f"it has no {part} state"
        got = _shapes(st[part])
        if got != want:
            bad = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
            return f"its {part} does not fit this run's ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    return None


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that changes what the run computes (a key the
    saved config lacks counts as its default)."""
    defaults = TrainConfig().to_dict()
    saved = upgrade_saved_config(saved)
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in RESUME_FREE:
            continue
        a, b = saved.get(k, defaults.get(k)), current.get(k, defaults.get(k))
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


class Trainer:
    """Runs one command (``finetune`` or ``prune``) for a resolved config."""

    def __init__(self, cfg: TrainConfig, command: str, *, resume: bool = False, log: Callable[[str], None] | None = None):
        if command not in ("finetune", "prune"):
            raise ValueError(f"cofi.training: command must be finetune or prune, got {command!r}")
        if resume and cfg.overwrite:
            raise UserError("cofi: --resume continues the run in output_dir and --overwrite deletes it; pass one of them")
        self.cfg, self.command, self.resume = cfg, command, resume
        self.dist = dd.init(cfg.device)
        self._lock_fd: int | None = None
        self.out = Path(cfg.output_dir)
        self._print = log or print
        self.device = torch.device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.mask_gen: torch.Generator | None = None
        self.maskset = None
        self.teacher = None
        self.teacher_cache: TeacherCache | None = None
        self.proj = None

    def log(self, msg: str) -> None:
        if self.dist.main:
            self._print(msg)

    # ------------------------------------------------------------------ setup
    def _seed(self, s: int) -> None:
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.manual_seed(s)

    # ------------------------------------------------------------------ the output folder
    def _claim_output(self) -> None:
        """Rank 0 locks the output folder for the run (a second run there is refused), refuses
        a previous run's outputs unless resuming or ``overwrite`` (which deletes them) and removes
        temp files of failed writes; every rank learns whether that worked."""
        err: UserError | None = None
        if self.dist.main:
            try:
                self._lock_and_check()
            except UserError as e:
                err = e
        if not dd.all_true(err is None, self.dist, self.device):
            self.release()
            raise err if err is not None else UserError(
                f"cofi: rank 0 refused the output folder {self.out} (see its error)")

    def _lock_and_check(self) -> None:
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            ran_here = (out / LOCK).exists()  # a cofi run used this folder before
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cofi: cannot use output folder {out}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"cofi: output folder {out} is in use by another run (pid {holder or '?'}); "
                            "wait for it to finish or choose another --output-dir") from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if present and not self.resume:
            if not self.cfg.overwrite:
                shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
                raise UserError(f"cofi: output folder {out} is not empty ({shown}); pass --resume to continue the "
                                "run in it or --overwrite to delete its outputs and start afresh")
            gone = [n for n in present if n in RUN_OUTPUTS or (n.startswith("rank") and n.endswith(".pt"))
                    or C.is_temp_name(n)]
            if gone and not ran_here:
                raise UserError(f"cofi: --overwrite: output folder {out} holds {', '.join(gone[:4])} but no cofi run "
                                f"used it ({LOCK} is missing); delete them yourself or choose another --output-dir")
            for n in gone:
                p = out / n
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            kept = sorted(set(present) - set(gone))
            if gone:
                self.log(f"cofi: --overwrite: deleted the previous run's outputs in {out} ({', '.join(gone)})")
            if kept:
                self.log(f"cofi: --overwrite: kept {', '.join(kept)} in {out} (not written by cofi)")
        stale = C.clean_temp_files(out) + C.clean_temp_files(out / "checkpoints")
        if stale:
            self.log(f"cofi: removed {len(stale)} temp file(s) of interrupted writes: {', '.join(p.name for p in stale)}")

    def release(self) -> None:
        """Give up the output folder's lock (the lock file stays; it is not part of the run)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _save_config(self) -> None:
        if self.dist.main:
            d = {k: v for k, v in self.cfg.to_dict().items() if k != "overwrite"}
            C.atomic_write_bytes(self.out / "config.yaml", yaml.safe_dump(d, sort_keys=False).encode())

    def setup_common(self) -> None:
        cfg = self.cfg
        self._claim_output()
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics = JsonlLog(self.out / "metrics.jsonl", self.dist.main)
        self.task = load_task_bundle(cfg, cfg.model)
        if len(self.task.train) == 0:
            raise ConfigError("cofi: the training set is empty")
        self.metric_name = cfg.metric_for_best or self.task.spec.primary
        if self.metric_name not in self.task.spec.metrics:
            raise ConfigError(f"cofi config: metric_for_best must be one of {self.task.spec.metrics} for task "
                              f"{self.task.spec.name!r}, got {self.metric_name!r}")

    def _load(self, path: str) -> torch.nn.Module:
        qa = self.task.qa
        n = 1 if self.task.spec.kind == "regression" else self.task.spec.num_labels
        return load_model(path, qa=qa, num_labels=n, dropout=self.cfg.dropout,
                          max_length=self.cfg.max_seq_length).to(self.device)

    def setup_models(self) -> None:
        cfg = self.cfg
        self._seed(cfg.seed)  # identical init on every rank (classifier head, masks, projection)
        self.student = self._load(cfg.model)
        vocab = len(self.task.tokenizer)
        if self.student.config.vocab_size < vocab:
            raise ConfigError(f"cofi: tokenizer of {cfg.model} has {vocab} tokens but the model's vocab_size is "
                              f"{self.student.config.vocab_size}")
        if self.command == "prune":
            from ..masks import MaskConfig, MaskSet

            if cfg.teacher is not None:
                self.teacher = self._load(cfg.teacher).eval()
                for p in self.teacher.parameters():
                    p.requires_grad_(False)
                tv, sv = self.teacher.config.vocab_size, self.student.config.vocab_size
                if tv != sv:
                    raise ConfigError(f"cofi: teacher/student vocab mismatch: teacher {cfg.teacher} has vocab_size {tv}, "
                                      f"student {cfg.model} has {sv}; they must share a tokenizer")
                if self.use_layer_distill:
                    self.proj = LS.identity_projection(self.student.config.hidden_size,
                                                       self.teacher.config.hidden_size, device=self.device)
                self.setup_teacher_cache()
            mcfg = MaskConfig.from_hf_config(self.student.config, groups=tuple(cfg.mask_groups), init_mean=cfg.mask_init,
                                             temperature=cfg.temperature, droprate_init=cfg.droprate_init)
            self.maskset = MaskSet(mcfg, device=self.device)
            self.mask_gen = torch.Generator(device=self.device)
            self.mask_gen.manual_seed(cfg.seed + 7919)
        if cfg.freeze_embeddings:
            for n, p in self.student.named_parameters():
                if "embeddings" in n:
                    p.requires_grad_(False)
        dd.broadcast_params(self._all_params(), self.dist)
        self._seed(cfg.seed + 1000 * self.dist.rank)  # dropout differs per rank, as in DDP

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return LS.default_teacher_layers(self.teacher.config.num_hidden_layers) if self.use_layer_distill else ()

    def setup_teacher_cache(self) -> None:
        """``teacher_cache``: on = the teacher's outputs for every training example from one pass
        (teacher_cache.py); off = one teacher forward per step (the reference); auto = on unless the
        task is QA or the cache would exceed ``teacher_cache_max_gb``. The choice is logged."""
        cfg = self.cfg
        tl = self.teacher_layers
        need = cache_bytes(self.task.train.lengths, len(tl), self.teacher.config.hidden_size,
                           max(1, self.task.spec.num_labels))
        why = None
        if cfg.teacher_cache == "off":
            why = "teacher_cache=off"
        elif self.task.qa:
            why = "QA teachers have per-token logits"
        elif cfg.teacher_cache == "auto" and need > cfg.teacher_cache_max_gb * 2 ** 30:
            why = f"{need / 2 ** 30:.1f} GiB > teacher_cache_max_gb={cfg.teacher_cache_max_gb}"
        if why is not None:
            if cfg.teacher_cache == "on":
                raise ConfigError(f"cofi config: teacher_cache=on is impossible here: {why}")
            self.log(f"[teacher] one teacher forward per step ({why})")
            return
        self.teacher_cache = TeacherCache.build(self.teacher, self.task.train, tl, cfg.eval_batch_size, self.device,
                                                forward)
        self.log(f"[teacher] outputs of {len(self.task.train)} training examples cached in "
                 f"{self.teacher_cache.build_s:.1f} s ({self.teacher_cache.nbytes / 2 ** 20:.0f} MiB, layers {list(tl)})")

    @property
    def use_layer_distill(self) -> bool:
        return self.cfg.teacher is not None and self.cfg.layer_distill != "none" and self.cfg.distill_layer_alpha > 0

    def _model_named(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.proj is not None and model is self.student:
            named += [("layer_transformation." + n, p) for n, p in self.proj.named_parameters()]
        return named

    def _all_params(self) -> list[torch.nn.Parameter]:
        ps = [p for _, p in self._model_named(self.model)] if hasattr(self, "model") else \
            [p for _, p in self._model_named(self.student)]
        if self.maskset is not None:
            ps += list(self.maskset.parameters())
        return ps

    # ------------------------------------------------------------------ schedule arithmetic
    def steps_per_epoch(self, bs: int) -> int:
        return D.num_batches(len(self.task.train), bs)

    # ------------------------------------------------------------------ optimisers
    def build_optim(self, model, lr: float, sched: str, total: int, pruning: bool) -> None:
        cfg = self.cfg
        named = self._model_named(model)
        self.model_params = [p for _, p in named]
        self.opt = _adamw(_wd_groups(named, cfg.weight_decay), lr, cfg)
        self.sched = _schedule(self.opt, sched, total, cfg.warmup_steps)
        self.l0_opt = self.lam_opt = None
        if pruning:
            ms = self.maskset
            self.l0_opt = torch.optim.AdamW([ms.log_alpha], lr=cfg.reg_learning_rate, weight_decay=0.0)
            self.lam_opt = torch.optim.AdamW([ms.lambda_1, ms.lambda_2], lr=cfg.reg_learning_rate, weight_decay=0.0)

    def optim_state(self) -> dict:
        st = {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}
        if self.l0_opt is not None:
            st["l0_opt"] = self.l0_opt.state_dict()
            st["lam_opt"] = self.lam_opt.state_dict()
        return st

    def load_optim_state(self, st: dict) -> None:
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.l0_opt is not None:
            self.l0_opt.load_state_dict(st["l0_opt"])
            self.lam_opt.load_state_dict(st["lam_opt"])

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, masks=None) -> dict[str, float]:
        cfg, task = self.cfg, self.task
        was = model.training
        model.eval()
        enc = task.eval
        batches = D.eval_batches(enc.lengths, cfg.eval_batch_size)
        if cfg.max_eval_batches:
            batches = batches[: cfg.max_eval_batches]
        outs: dict[int, list[np.ndarray]] = {}
        for b in batches:
            batch = {k: v.to(self.device) for k, v in enc.collate(b).items()}
            out = forward(model, batch, masks, cfg.backend)
            ls = [x.float().cpu().numpy() for x in logits_of(out)]
            for r, i in enumerate(b):
                outs[int(i)] = [x[r] for x in ls]
        model.train(was)
        idx = sorted(outs)
        if task.qa:
            S = max(len(outs[i][0]) for i in idx)
            st = np.full((len(enc), S), -1e9, dtype=np.float32)
            en = np.full((len(enc), S), -1e9, dtype=np.float32)
            for i in idx:
                st[i, : len(outs[i][0])] = outs[i][0]
                en[i, : len(outs[i][1])] = outs[i][1]
            preds = D.qa_predictions(enc, st, en)
            return D.squad_scores(preds, enc.extra["answers"])
        logits = np.stack([outs[i][0] for i in idx])
        labels = enc.labels[idx]
        preds = logits[:, 0] if task.spec.kind == "regression" else logits.argmax(-1)
        return D.compute_metrics(task.spec.metrics, preds, labels)

    # ------------------------------------------------------------------ checkpoint
    def _state(self, stage: str, model, ls: LoopState, phase: str) -> dict:
        """Tensors and plain data only (checkpoints are loaded with weights_only=True)."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k != "overwrite"}
        st = {"stage": stage, "phase": phase, "loop": _plain(ls.__dict__), "config": cfg,
              "model": model.state_dict(), "optim": self.optim_state(), "rng": C.rng_state(self.mask_gen)}
        if self.maskset is not None:
            st["maskset"] = self.maskset.state_dict()
        if self.proj is not None and stage == "prune":
            st["proj"] = self.proj.state_dict()
        if stage == "compact":  # results.json needs the pruning summary after a resume in stage 2
            st["prune_result"] = _plain(getattr(self, "prune_result", None))
        return st

    def _rank_rng(self) -> dict[str, list[torch.Tensor]]:
        """Every rank's own generator states (dropout draws differ per rank), gathered to all."""
        out = {"torch": dd.gather_tensors(torch.get_rng_state(), self.dist, self.device)}
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            out["cuda"] = dd.gather_tensors(torch.cuda.get_rng_state(self.device), self.dist, self.device)
        return out

    def _set_rank_rng(self, st: dict) -> None:
        rr, world = st.get("rng_ranks"), self.dist.world
        if rr is None or len(rr["torch"]) != world:
            if world > 1 or rr is not None:
                self.log(f"cofi: --resume with {world} process(es) from a checkpoint of "
                         f"{len(rr['torch']) if rr else 1}: the dropout draws differ from an uninterrupted run")
            return
        torch.set_rng_state(rr["torch"][self.dist.rank])
        if "cuda" in rr and self.device.type == "cuda":
            torch.cuda.set_rng_state(rr["cuda"][self.dist.rank], self.device)

    def save_ckpt(self, stage: str, model, ls: LoopState, phase: str) -> None:
        rank_rng = self._rank_rng()
        if self.dist.main:
            st = self._state(stage, model, ls, phase)
            st["rng_ranks"] = rank_rng
            C.save_checkpoint(self.ckpt_dir, STAGES[stage], ls.step, st, keep=self.cfg.keep_checkpoints)
        dd.barrier(self.dist)

    def _check_state(self, path: Path, st: dict) -> str | None:
        """Why a loaded checkpoint cannot be this run's (None = it can): its keys and types, and
        the shapes of the weights it would load into the models built so far. A checkpoint of
        another command's run is not skipped but refused (CheckpointError): the folder is not
        this run's."""
        allowed = ("finetune",) if self.command == "finetune" else ("prune", "compact")
        if st["stage"] not in allowed:
            raise C.CheckpointError(f"cofi: --resume: {self.out} holds a `cofi {'finetune' if st['stage'] == 'finetune' else 'prune'}` "
                                    f"run (checkpoint {path.name}), not a `cofi {self.command}` one; choose another --output-dir")
        return check_train_state(st, self._current_shapes(st.get("stage")))

    def _current_shapes(self, stage: str | None) -> dict[str, dict[str, tuple[int, ...]]]:
        if stage == "compact":  # the folded model's shape is known only after folding
            return {}
        shapes = {"model": _shapes(self.student.state_dict())}
        if self.maskset is not None:
            shapes["maskset"] = _shapes(self.maskset.state_dict())
        if self.proj is not None and stage == "prune":
            shapes["proj"] = _shapes(self.proj.state_dict())
        return shapes

    def _saved_config_diff(self) -> list[str]:
        """config_diff against the folder's config.yaml (none: nothing to compare)."""
        p = self.out / "config.yaml"
        try:
            saved = yaml.safe_load(p.read_text()) if p.is_file() else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        if not isinstance(saved, dict):
            return []
        return config_diff(saved, self.cfg.to_dict())

    def find_resume(self) -> dict | None:
        """The state to resume from (None: start from scratch). Refuses a checkpoint of a run
        with a different configuration; checkpoints newer than the one used are set aside; the
        metrics log keeps only the records of steps the returned state has reached."""
        state = None
        if self.resume:
            got = C.load_latest(self.ckpt_dir, log=self.log, check=self._check_state)
            if got is None:
                diff = self._saved_config_diff()
                if diff:
                    raise C.CheckpointError(
                        f"cofi: --resume: no usable checkpoint in {self.ckpt_dir}, and {self.out / 'config.yaml'} is of a "
                        f"run with a different configuration ({'; '.join(diff)}); pass --overwrite to start afresh")
                self.log(f"cofi: --resume: no usable checkpoint in {self.ckpt_dir}; starting from scratch")
            else:
                path, state = got
                diff = config_diff(state["config"], self.cfg.to_dict())
                if diff:
                    raise C.CheckpointError(
                        f"cofi: --resume: checkpoint {path} is of a run with a different configuration "
                        f"({'; '.join(diff)}); resume with the same settings, or pass --overwrite to start afresh")
                self.log(f"cofi: resuming from {path} (stage {state['stage']}, step {state['loop']['step']})")
            dd.barrier(self.dist)
            if self.dist.main:
                for p in C.reject_newer(self.ckpt_dir, got[0] if got is not None else None):
                    self.log(f"cofi: set aside unusable checkpoint {p} as {p.name}{C.REJECTED}")
        if state is None:
            self.metrics.truncate_after(-1, 0)  # a fresh start: no record of an earlier attempt survives
        self._save_config()
        dd.barrier(self.dist)
        return state

    # ------------------------------------------------------------------ the generic loop
    def loop(self, stage: str, model, *, bs: int, total: int, step_fn, phase_fn=None, resume_state: dict | None,
             eval_fn, label: str) -> LoopState:
        """Runs ``total`` steps. ``step_fn(batch, ls) -> dict`` does forward/backward/optimiser;
        ``phase_fn(ls)`` is called before each step (phase switches); ``eval_fn(ls) -> dict``."""
        cfg = self.cfg
        ls = LoopState()
        if resume_state is not None:
            ls = LoopState(**resume_state["loop"])
            if phase_fn is not None:
                phase_fn(ls, force=True)
            try:
                self.load_optim_state(resume_state["optim"])
            except (KeyError, ValueError, RuntimeError, TypeError) as e:
                raise C.CheckpointError(f"cofi: --resume: the checkpoint's optimizer state does not fit this run "
                                        f"({type(e).__name__}: {C.first_line(e)})") from e
            C.set_rng_state(resume_state["rng"], self.mask_gen)
            self._set_rank_rng(resume_state)
            self.metrics.truncate_after(STAGES[stage], ls.step)
        else:  # records of this stage are from an attempt that did not reach a checkpoint
            self.metrics.truncate_after(STAGES[stage] - 1, 2 ** 62)
        model.train()
        pbar = None
        if cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            pbar = tqdm(total=total, initial=ls.step, desc=label, dynamic_ncols=True, mininterval=1.0)
        t0, s0 = time.perf_counter(), ls.step
        lengths = self.task.train.lengths
        if ls.step == 0 and resume_state is None and cfg.eval_steps and stage != "finetune":
            eval_fn(ls)
        while ls.step < total:
            batches = D.epoch_batches(lengths, bs, cfg.seed, ls.epoch, group_by_length=cfg.group_by_length)
            while ls.batch_in_epoch < len(batches) and ls.step < total:
                if phase_fn is not None:
                    phase_fn(ls)
                gb = batches[ls.batch_in_epoch]
                mine = D.rank_slice(gb, self.dist.rank, self.dist.world)
                batch = {k: v.to(self.device) for k, v in self.task.train.collate(mine).items()}
                batch["example_index"] = mine
                rec = step_fn(batch, ls)
                ls.step += 1
                ls.batch_in_epoch += 1
                if _KILL_AT is not None and (stage, ls.step) == _KILL_AT:  # tests: die like a preempted job
                    os.kill(os.getpid(), signal.SIGKILL)
                rate = (ls.step - s0) / max(time.perf_counter() - t0, 1e-9)
                if ls.step % cfg.logging_steps == 0 or ls.step == total:
                    rec = {k: (float(v) if torch.is_tensor(v) else v) for k, v in rec.items()}
                    rec.update(stage=stage, step=ls.step, epoch=ls.epoch + ls.batch_in_epoch / len(batches),
                               lr=self.sched.get_last_lr()[0], steps_per_s=rate)
                    self.metrics.write(rec)
                    if pbar is not None:
                        pbar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in rec.items()
                                          if k in ("loss", "expected_sparsity", "real_sparsity", "target_sparsity",
                                                   "lambda_1", "lambda_2", "steps_per_s")}, refresh=False)
                if pbar is not None:
                    pbar.update(1)
                if ls.step % cfg.eval_steps == 0 or ls.step == total:
                    eval_fn(ls)
                if ls.step % cfg.save_steps == 0 or ls.step == total:
                    self.save_ckpt(stage, model, ls, getattr(self, "phase", "train"))
            if ls.batch_in_epoch >= len(batches):
                ls.epoch += 1
                ls.batch_in_epoch = 0
        if pbar is not None:
            pbar.close()
        return ls

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        cfg = self.cfg
        loss.backward()
        # A compact step gives no gradient to the weights of units it cut out; dense mode (the
        # reference) gives them zeros, on which AdamW still moves them (momentum, weight decay).
        # Zeros here make both modes, and one process vs data parallel, take the same step.
        for p in self.model_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        params = list(self.model_params)
        if self.l0_opt is not None:
            params += [self.maskset.log_alpha, self.maskset.lambda_1, self.maskset.lambda_2]
        dd.average_grads(params, self.dist)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model_params, cfg.max_grad_norm)
        self.opt.step()
        if self.l0_opt is not None:
            self.l0_opt.step()
            self.maskset.ascend_lambdas_()
            self.lam_opt.step()
        self.sched.step()
        if self.l0_opt is not None:
            self.maskset.clamp_()
        self.opt.zero_grad(set_to_none=True)
        if self.l0_opt is not None:
            self.l0_opt.zero_grad(set_to_none=True)
            self.lam_opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ finetune
    def run_finetune(self) -> dict:
        cfg = self.cfg
        self.setup_common()
        self.setup_models()
        self.model = self.student
        spe = self.steps_per_epoch(cfg.batch_size)
        total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * spe))
        self.phase = "train"
        self.build_optim(self.student, cfg.learning_rate, cfg.scheduler, total, pruning=False)
        st = self.find_resume()
        if st is not None:
            self.student.load_state_dict(st["model"])
        best_dir = self.out / "best"

        def step_fn(batch, ls):
            out = forward(self.student, batch)
            loss = task_loss(self.task.spec, out, batch["labels"])
            self._optimizer_step(loss)
            return {"loss": loss.detach()}

        def eval_fn(ls):
            m = self.evaluate(self.student)
            rec = {"stage": "finetune", "step": ls.step, "eval": m}
            self.metrics.write(rec)
            ls.last_eval = m
            v = m[self.metric_name]
            if ls.best_metric is None or v > ls.best_metric:
                ls.best_metric, ls.best_step = v, ls.step
                if self.dist.main:
                    self.student.save_pretrained(str(best_dir))
                    self.task.tokenizer.save_pretrained(str(best_dir))
            self.log(f"[finetune] step {ls.step}: {self.metric_name} {v:.4f} (best {ls.best_metric:.4f} @ {ls.best_step})")

        ls = self.loop("finetune", self.student, bs=cfg.batch_size, total=total, step_fn=step_fn,
                       resume_state=st, eval_fn=eval_fn, label="finetune")
        final = self.out / "final"
        if self.dist.main:
            self.student.save_pretrained(str(final))
            self.task.tokenizer.save_pretrained(str(final))
            res = {"best_metric": ls.best_metric, "best_step": ls.best_step, "metric": self.metric_name,
                   "last_eval": ls.last_eval, "steps": ls.step, "best_dir": str(best_dir)}
            C.atomic_write_bytes(self.out / "results.json", json.dumps(res, indent=2).encode())
        dd.barrier(self.dist)
        return {"best_metric": ls.best_metric, "best_dir": str(best_dir), "steps": ls.step, "last_eval": ls.last_eval}

    # ------------------------------------------------------------------ prune (stage 1)
    def target_at(self, step: int) -> float:
        p = step - self.pre_steps
        if self.warmup_steps <= 0:
            return self.cfg.target_sparsity
        return self.cfg.target_sparsity * min(1.0, max(0, p) / self.warmup_steps)

    def distill_losses(self, batch, out, masks, layer_exists=None, proj=None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if self.teacher_cache is not None:
            t_out = self.teacher_cache.lookup(batch["example_index"], batch["attention_mask"])
        else:
            with torch.no_grad():
                t_out = forward(self.teacher, batch, hidden=self.use_layer_distill)
        if cfg.distill_pred_alpha > 0:
            terms["pred_loss"] = pred_distill_loss(self.task.spec, out, t_out, cfg.distill_temp)
        if self.use_layer_distill:
            tl = self.teacher_layers
            alive = None if layer_exists is None else [bool(a) for a in layer_exists]
            idx = getattr(out, "hidden_index", None)
            # data parallel: match layers on the GLOBAL batch (loss matrix averaged over ranks)
            reduce = None if self.dist.world == 1 else (lambda lm: dd.all_reduce_mean_(lm, self.dist))
            terms["layer_loss"], _ = LS.layer_distill_loss(
                list(out.hidden_states), list(t_out.hidden_states), proj, teacher_layers=tl,
                version=cfg.layer_distill, student_index=idx, alive=alive, token_mask=batch.get("attention_mask"),
                reduce_matrix=reduce)
        if cfg.ce_alpha > 0:
            terms["ce_loss"] = task_loss(self.task.spec, out, batch["labels"])
        return terms

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.cfg
        w = {"pred_loss": cfg.distill_pred_alpha, "layer_loss": cfg.distill_layer_alpha, "ce_loss": cfg.ce_alpha,
             "lagrangian": 1.0}
        return sum(w[k] * v for k, v in terms.items())

    def run_prune(self) -> dict:
        cfg = self.cfg
        self.setup_common()
        self.setup_models()
        self.model = self.student
        spe = self.steps_per_epoch(cfg.batch_size)
        total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * spe))
        self.pre_steps = cfg.prepruning_steps if cfg.prepruning_steps is not None else int(round(cfg.prepruning_epochs * spe))
        self.warmup_steps = (cfg.lagrangian_warmup_steps if cfg.lagrangian_warmup_steps is not None
                             else int(round(cfg.lagrangian_warmup_epochs * spe)))
        if self.pre_steps >= total:
            raise ConfigError(f"cofi config: pre-pruning ({self.pre_steps} steps) leaves no pruning steps of "
                              f"{total}; lower prepruning_epochs/prepruning_steps or raise epochs/max_steps")
        self.log(f"[prune] {len(self.task.train)} examples, {spe} steps/epoch, {total} steps: {self.pre_steps} "
                 f"pre-pruning, Lagrangian warm-up {self.warmup_steps}, target {cfg.target_sparsity}, backend {cfg.backend}")
        st = self.find_resume()
        resume_stage = st["stage"] if st is not None else None
        if resume_stage == "compact":
            self.prune_result = st.get("prune_result")
            if cfg.skip_compact:
                self.log("[prune] --skip-compact: the pruning stage is complete; the compact stage is not resumed")
                self._write_results()
                return self.prune_result
            return self.run_compact(st)
        self.phase = "pre" if self.pre_steps > 0 else "pruning"
        self.build_optim(self.student, cfg.learning_rate, cfg.scheduler, total, pruning=self.phase == "pruning")
        if st is not None:
            self.student.load_state_dict(st["model"])
            self.maskset.load_state_dict(st["maskset"])
            if self.proj is not None:
                self.proj.load_state_dict(st["proj"])
        best_dir = self.out / "best"

        def phase_fn(ls, force=False):
            want = "pre" if ls.step < self.pre_steps else "pruning"
            if want != self.phase or force:
                self.phase = want
                if want == "pruning":  # reference: fresh model optimizer + schedule when pruning starts
                    self.build_optim(self.student, cfg.learning_rate, cfg.scheduler, total - self.pre_steps, pruning=True)
                    if not force:
                        self.log(f"[prune] step {ls.step}: pre-pruning distillation done; masks on")
                else:
                    self.build_optim(self.student, cfg.learning_rate, cfg.scheduler, total, pruning=False)

        def step_fn(batch, ls):
            pruning = self.phase == "pruning"
            mstep = self.maskset.step(generator=self.mask_gen) if pruning else None
            masks = mstep.z if pruning else None
            out = forward(self.student, batch, masks, cfg.backend, hidden=self.use_layer_distill)
            exists = None
            if masks is not None and (masks.mha is not None or masks.ffn is not None):
                L = self.student.config.num_hidden_layers
                mha = masks.mha.detach() if masks.mha is not None else torch.zeros(L)
                ffn = masks.ffn.detach() if masks.ffn is not None else torch.zeros(L)
                exists = ((mha != 0) | (ffn != 0)).cpu()
            if self.teacher is not None:
                terms = self.distill_losses(batch, out, masks, exists, self.proj)
            else:
                terms = {"ce_loss": task_loss(self.task.spec, out, batch["labels"])}
            rec: dict[str, Any] = {}
            if pruning:
                t = self.target_at(ls.step)
                lag, exp_s = self.maskset.lagrangian(t, step=mstep)
                terms["lagrangian"] = lag
                rec.update(target_sparsity=t, expected_sparsity=exp_s.detach(),
                           lambda_1=self.maskset.lambda_1.detach().sum(), lambda_2=self.maskset.lambda_2.detach().sum())
            loss = self.combine(terms)
            self._optimizer_step(loss)
            rec.update({k: v.detach() for k, v in terms.items()}, loss=loss.detach(), phase=self.phase)
            if pruning and (ls.step + 1) % cfg.logging_steps == 0:
                rec["real_sparsity"] = self.maskset.real_sparsity(self.maskset.deterministic(cfg.deterministic_mode))
            return rec

        def eval_fn(ls):
            pruning = ls.step >= self.pre_steps and ls.step > 0 or self.pre_steps == 0
            masks = self.maskset.deterministic(cfg.deterministic_mode) if pruning else None
            m = self.evaluate(self.student, masks)
            _, exp_s = self.maskset.expected_sparsity()
            real = self.maskset.real_sparsity(masks) if masks is not None else 0.0
            rec = {"stage": "prune", "step": ls.step, "eval": m, "real_sparsity": real,
                   "expected_sparsity": float(exp_s.detach()), "target_sparsity": self.target_at(ls.step) if pruning else 0.0,
                   "lambda_1": float(self.maskset.lambda_1.detach().sum()),
                   "lambda_2": float(self.maskset.lambda_2.detach().sum())}
            if masks is not None:
                rec["structure"] = structure_summary(masks)
            self.metrics.write(rec)
            ls.last_eval = {**m, "real_sparsity": real}
            v = m[self.metric_name]
            # "best" only among evaluations whose real sparsity is within epsilon of the target
            # (the reference accepts any overshoot; a much sparser model is a different operating point)
            if pruning and abs(real - cfg.target_sparsity) <= cfg.sparsity_epsilon and \
                    (ls.best_metric is None or v > ls.best_metric):
                ls.best_metric, ls.best_step, ls.best_sparsity = v, ls.step, real
                if self.dist.main:
                    self.save_pruned(best_dir, masks, {**m, "real_sparsity": real, "step": ls.step})
            self.log(f"[prune] step {ls.step}: {self.metric_name} {v:.4f}, real sparsity {real:.4f}, expected "
                     f"{float(exp_s.detach()):.4f}" + (f" (best {ls.best_metric:.4f} @ {ls.best_step})" if ls.best_metric is not None else ""))

        ls = self.loop("prune", self.student, bs=cfg.batch_size, total=total, step_fn=step_fn, phase_fn=phase_fn,
                       resume_state=st, eval_fn=eval_fn, label="prune")
        final_masks = self.maskset.deterministic(cfg.deterministic_mode)
        if self.dist.main:
            self.save_pruned(self.out / "final", final_masks, {**ls.last_eval, "step": ls.step})
        dd.barrier(self.dist)
        self.prune_result = {"best_metric": ls.best_metric, "best_step": ls.best_step, "best_sparsity": ls.best_sparsity,
                             "last_eval": ls.last_eval, "steps": ls.step}
        if ls.best_metric is None:
            self.log(f"[prune] no evaluation had real sparsity within {cfg.sparsity_epsilon} of {cfg.target_sparsity}; "
                     "the final masks are used (consider more epochs or a higher reg_learning_rate)")
        if cfg.skip_compact:
            self._write_results()
            return self.prune_result
        return self.run_compact(None)

    def save_pruned(self, d: Path, masks, metrics: dict) -> None:
        """Full-size student + deterministic masks + mask parameters + projection + metrics."""
        from safetensors.torch import save_file

        d.mkdir(parents=True, exist_ok=True)
        self.student.save_pretrained(str(d))
        self.task.tokenizer.save_pretrained(str(d))
        save_file({k: v.contiguous() for k, v in masks.state_dict().items()}, str(d / "masks.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.maskset.state_dict().items()},
                  str(d / "mask_params.safetensors"))
        if self.proj is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.proj.state_dict().items()},
                      str(d / "layer_transformation.safetensors"))
        (d / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # ------------------------------------------------------------------ stage 2: compact fine-tuning
    def _fold(self):
        from safetensors.torch import load_file

        from ..masks import Masks
        from ..pruning import prune

        src = self.out / "best" if (self.out / "best" / "masks.safetensors").exists() else self.out / "final"
        student = self._load(str(src)) if not hasattr(self, "student") else self.student
        if hasattr(self, "student"):
            sd = load_file(str(src / "model.safetensors")) if (src / "model.safetensors").exists() else None
            if sd is not None:
                student.load_state_dict(sd, strict=False)
        masks = Masks.from_state_dict(load_file(str(src / "masks.safetensors")))
        if masks.hidden is not None and not bool((masks.hidden != 0).any()):
            self._write_results()
            raise UserError(f"cofi: the pruned masks in {src} keep no hidden dimension (target_sparsity "
                            f"{self.cfg.target_sparsity}, mask_groups {','.join(self.cfg.mask_groups)}): there is no "
                            "model to fine-tune; lower target_sparsity, add mask groups or pass --skip-compact true")
        proj = None
        if (src / "layer_transformation.safetensors").exists() and self.proj is not None:
            self.proj.load_state_dict(load_file(str(src / "layer_transformation.safetensors")))
            proj = self.proj
        compact = prune(student, masks, layer_transformation=proj).to(self.device)
        return compact, masks, src

    def run_compact(self, st: dict | None) -> dict:
        cfg = self.cfg
        dd.barrier(self.dist)
        compact, masks, src = self._fold()
        self.model = compact
        self.log(f"[compact] folded {src}: {compact.num_encoder_params()} encoder params, sparsity "
                 f"{compact.sparsity():.4f}; heads {compact.config.num_heads_per_layer if hasattr(compact.config, 'num_heads_per_layer') else ''}")
        if compact.num_encoder_params() == 0:
            self.log("[compact] warning: the pruned masks keep no encoder layer: the compact model is embeddings + "
                     "task head only")
        if self.dist.main:
            compact.save_pretrained(str(self.out / "compact_folded"), tokenizer=self.task.tokenizer)
        self.maskset_saved = self.maskset
        spe = self.steps_per_epoch(cfg.compact_batch_size)
        total = cfg.compact_max_steps if cfg.compact_max_steps is not None else math.ceil(cfg.compact_epochs * spe)
        compact.train()
        self.phase = "compact"
        use_proj = self.use_layer_distill and compact.layer_transformation is not None
        # as in the pruning stage, embeddings (tables + their LayerNorm) stay frozen
        named = [(n, p) for n, p in compact.named_parameters()
                 if p.requires_grad and not (cfg.freeze_embeddings and "embeddings" in n)]
        self.proj_backup, self.proj = self.proj, None
        l0, self.maskset_backup = None, self.maskset
        self.maskset = None
        self.model_params = [p for _, p in named]
        self.opt = _adamw(_wd_groups(named, cfg.weight_decay), cfg.compact_learning_rate, cfg)
        self.sched = _schedule(self.opt, cfg.compact_scheduler, max(total, 1), cfg.warmup_steps)
        self.l0_opt = self.lam_opt = None
        if st is not None:
            why = check_train_state(st, {"model": _shapes(compact.state_dict())})
            if why is not None:
                raise C.CheckpointError(f"cofi: --resume: the compact-stage checkpoint does not fit the model folded "
                                        f"from {src}: {why}")
            compact.load_state_dict(st["model"])
        exists = None
        if hasattr(compact.config, "attention_present"):
            exists = torch.tensor([bool(a) or bool(f) for a, f in
                                   zip(compact.config.attention_present, compact.config.ffn_present)])

        def step_fn(batch, ls):
            out = forward(compact, batch, hidden=use_proj)
            if self.teacher is not None:
                terms = self.distill_losses(batch, out, None, exists, compact.layer_transformation if use_proj else None)
                if not use_proj:
                    terms.pop("layer_loss", None)
            else:
                terms = {"ce_loss": task_loss(self.task.spec, out, batch["labels"])}
            loss = self.combine(terms)
            self._optimizer_step(loss)
            return {**{k: v.detach() for k, v in terms.items()}, "loss": loss.detach()}

        comp_dir = self.out / "compact"

        def eval_fn(ls):
            m = self.evaluate(compact)
            rec = {"stage": "compact", "step": ls.step, "eval": m, "real_sparsity": compact.sparsity()}
            self.metrics.write(rec)
            ls.last_eval = m
            v = m[self.metric_name]
            if ls.best_metric is None or v > ls.best_metric:
                ls.best_metric, ls.best_step = v, ls.step
                if self.dist.main:
                    compact.save_pretrained(str(comp_dir), tokenizer=self.task.tokenizer)
            self.log(f"[compact] step {ls.step}: {self.metric_name} {v:.4f} (best {ls.best_metric:.4f} @ {ls.best_step})")

        if total > 0:
            ls = self.loop("compact", compact, bs=cfg.compact_batch_size, total=total, step_fn=step_fn,
                           resume_state=st, eval_fn=eval_fn, label="compact")
        else:
            ls = LoopState()
            self.metrics.truncate_after(STAGES["compact"] - 1, 2 ** 62)
            eval_fn(ls)
        self.compact_result = {"best_metric": ls.best_metric, "best_step": ls.best_step, "steps": ls.step,
                               "sparsity": compact.sparsity(), "encoder_params": compact.num_encoder_params(),
                               "dir": str(comp_dir)}
        self._write_results()
        return {"prune": getattr(self, "prune_result", None), "compact": self.compact_result}

    def _write_results(self) -> None:
        if self.dist.main:
            res = {"prune": getattr(self, "prune_result", None), "compact": getattr(self, "compact_result", None),
                   "metric": self.metric_name}
            C.atomic_write_bytes(self.out / "results.json", json.dumps(res, indent=2).encode())
        dd.barrier(self.dist)

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict:
        res = self.run_finetune() if self.command == "finetune" else self.run_prune()
        if os.environ.get("COFI_TEST_DUMP_RANKS"):  # tests: every rank's final weights and log_alpha
            st = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
            if self.maskset is not None:
                st["maskset"] = {k: v.detach().cpu() for k, v in self.maskset.state_dict().items()}
            torch.save(st, self.out / f"rank{self.dist.rank}.pt")
        return res


def structure_summary(masks) -> dict:
    """What survives a deterministic mask set: hidden size, heads per layer, FFN width per layer."""
    out = {}
    L = None
    if masks.hidden is not None:
        out["hidden"] = int((masks.hidden != 0).sum())
    if masks.head is not None:
        heads = (masks.head != 0).sum(-1)
        if masks.mha is not None:
            heads = heads * (masks.mha != 0)
        out["heads"] = [int(x) for x in heads]
        L = len(heads)
    if masks.intermediate is not None:
        w = (masks.intermediate != 0).sum(-1)
        if masks.ffn is not None:
            w = w * (masks.ffn != 0)
        out["ffn"] = [int(x) for x in w]
    return out
