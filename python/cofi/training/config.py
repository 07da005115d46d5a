"""One dataclass per run: every key with its type and help, YAML in/out, type coercion read from
the annotations, validation with clear errors. The resolved config is saved with every checkpoint
and as ``config.yaml`` in the output folder; presets and the command line are in ``config_cli``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import UserError
from ..vocab import GROUPS


class ConfigError(UserError):
    """A run configuration is invalid; the message names the field, the value and what is allowed."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its one-line help (shown by ``--help``)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


Scheduler = Literal["linear", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """Every key of a run. Each field's ``metadata["help"]`` is its ``--help`` line; ``Literal``
    types list a choice key's values (checked by :meth:`validate`)."""

    # ---------------------------------------------------------------- task and data
    task: str = _f("sst2", "task name (cofi.data.tasks.TASKS); custom = your own train_file / eval_file")
    train_file: str | None = _f(None, "training data file (csv/tsv/json/jsonl/parquet); None = the task's own data")
    eval_file: str | None = _f(None, "evaluation data file; None = the task's own evaluation split")
    eval_split: str | None = _f(None, "split of the task's data to evaluate on; None = the task's default")
    text_fields: list[str] | None = _f(None, "one or two text columns (comma-separated); None = the task's own")
    label_field: str | None = _f(None, "label column; None = the task's own")
    num_labels: int | None = _f(None, "number of classes; None = the task's own")
    max_seq_length: int = _f(128, "tokens per example (longer ones are truncated)")
    doc_stride: int = _f(128, "QA: token stride between the context windows of one long example")
    max_train_samples: int | None = _f(None, "use only the first N training examples; None = all")
    max_eval_samples: int | None = _f(None, "use only the first N evaluation examples; None = all")
    group_by_length: bool = _f(True, "batch examples of similar length together (less padding)")
    # ---------------------------------------------------------------- models
    model: str = _f("", "pre-trained checkpoint the student (or the teacher to fine-tune) starts from")
    teacher: str | None = _f(None, "fine-tuned teacher folder (prune); None = no distillation")
    tokenizer: str | None = _f(None, "tokenizer folder or hub name; None = the one in model")
    output_dir: str = _f("runs/cofi", "folder for checkpoints, metrics, config.yaml and the results")
    # ---------------------------------------------------------------- optimisation (teacher fine-tuning / pruning)
    batch_size: int = _f(32, "training batch size")
    eval_batch_size: int = _f(64, "evaluation batch size")
    learning_rate: float = _f(2e-5, "model learning rate (fine-tuning / pruning)")
    weight_decay: float = _f(0.0, "AdamW weight decay of the model weights")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps of the model optimizer")
    max_grad_norm: float = _f(1.0, "clip the model gradients to this norm; 0 = no clipping")
    epochs: float = _f(20.0, "training epochs (fine-tuning / pruning)")
    max_steps: int | None = _f(None, "training steps; overrides epochs when set")
    scheduler: Scheduler = _f("linear", "model learning-rate schedule")
    freeze_embeddings: bool | None = _f(None, "keep the embeddings fixed; None: true for prune (reference), "
                                              "false for finetune")
    dropout: float | None = _f(None, "dropout probability; None = the checkpoint's own dropout")
    # ---------------------------------------------------------------- CoFi
    target_sparsity: float | None = _f(None, "fraction of the encoder's weights to remove, in [0, 1); "
                                             "None = 0.95 unless a target shape (target_*) is given")
    sparsity_epsilon: float = _f(0.005, "the delivered model's real sparsity is within this of target_sparsity "
                                        "(masks further off are projected onto the budget)")
    target_hidden: int | None = _f(None, "target architecture: hidden size (instead of target_sparsity)")
    target_heads: int | None = _f(None, "target architecture: attention heads per layer")
    target_ffn: int | None = _f(None, "target architecture: FFN units per layer")
    target_layers: int | None = _f(None, "target architecture: encoder layers")
    prepruning_epochs: float = _f(1.0, "distillation epochs before the masks start pruning")
    prepruning_steps: int | None = _f(None, "steps before pruning starts; overrides prepruning_epochs when set")
    lagrangian_warmup_epochs: float = _f(2.0, "epochs over which the target sparsity ramps up linearly from 0")
    lagrangian_warmup_steps: int | None = _f(None, "warm-up steps; overrides lagrangian_warmup_epochs when set")
    reg_learning_rate: float = _f(0.01, "learning rate of the masks' log_alpha and the Lagrange multipliers")
    reg_learning_rate_adapt: bool = _f(True, "raise reg_learning_rate when the Lagrangian warm-up is too short for "
                                             "log_alpha to follow the ramp (3 x its travel / warm-up steps); "
                                             "off when reg_learning_rate is given on the command line, --config or --set")
    mask_groups: list[str] = _f(list(GROUPS), f"mask groups to prune (comma-separated): {', '.join(GROUPS)}")
    mask_init: Literal["reference", "uniform"] = _f("reference", "initial log_alpha per group "
                                                                 "(cofi.masks.INIT_PRESETS)")
    droprate_init: float = _f(0.5, "initial drop rate of the hard-concrete masks, in (0, 1)")
    temperature: float = _f(2.0 / 3.0, "hard-concrete temperature")
    deterministic_mode: Literal["soft", "binary"] = _f("soft", "evaluation masks: soft (reference) or binary")
    backend: Literal["compact", "dense"] = _f("compact", "compact (our cheap steps: live units only) or dense "
                                                         "(the reference's method)")
    # ---------------------------------------------------------------- distillation
    distill_temp: float = _f(2.0, "distillation temperature T of the prediction KL")
    distill_pred_alpha: float = _f(0.5, "weight of the prediction distillation loss")
    distill_layer_alpha: float = _f(0.5, "weight of the layer (hidden state) distillation loss")
    layer_distill: Literal["v3", "v4", "none"] = _f("v3", "layer distillation: v3, v4 (reference variants) or none")
    ce_alpha: float = _f(0.0, "weight of an optional ground-truth CE term while distilling")
    teacher_cache: Literal["auto", "on", "off"] = _f("auto", "teacher outputs per example from one pass "
                                                            "(teacher_cache.py); off = a teacher forward per step")
    teacher_cache_max_gb: float = _f(4.0, "auto: per-step teacher forward above this cache size (GB)")
    # ---------------------------------------------------------------- stage 2: fine-tune the compact model
    compact_epochs: float = _f(20.0, "fine-tuning epochs of the compact (pruned) model")
    compact_max_steps: int | None = _f(None, "compact fine-tuning steps; overrides compact_epochs when set")
    compact_learning_rate: float = _f(1e-5, "learning rate of the compact fine-tuning")
    compact_batch_size: int = _f(64, "batch size of the compact fine-tuning")
    compact_scheduler: Scheduler = _f("constant", "learning-rate schedule of the compact fine-tuning")
    skip_compact: bool = _f(False, "stop after pruning (no fold + compact fine-tuning)")
    # ---------------------------------------------------------------- eval, logging, checkpoints
    eval_steps: int = _f(500, "evaluate every N steps")
    logging_steps: int = _f(50, "log the losses every N steps")
    save_steps: int = _f(500, "save a checkpoint every N steps")
    keep_checkpoints: int = _f(2, "number of newest checkpoints kept")
    metric_for_best: str | None = _f(None, "metric that picks the best checkpoint; None = the task's primary metric")
    seed: int = _f(57, "random seed (data order, dropout, masks)")
    num_threads: int | None = _f(None, "CPU threads of torch; None = torch's default")
    progress: bool = _f(True, "show a progress bar")
    device: str = _f("cpu", "cpu, cuda or cuda:N")
    precision: Precision = _f("fp32", "training/eval precision: fp32, or bf16 / fp16 autocast (weights, optimizer "
                                      "state, masks and the Lagrangian stay fp32; fp16 adds a gradient scaler)")
    max_eval_batches: int | None = _f(None, "evaluate on the first N batches only; None = all")
    # run control, not saved with the run
    overwrite: bool = _f(False, "clear a previous run's outputs in output_dir first")

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: "TrainConfig | None" = None, source: str = "config",
                  user: bool = False) -> "TrainConfig":
        """``base`` (default: the defaults) with the keys of ``d`` set. ``user``: ``d`` is the
        user's own choice (command line, --config, --set; not a preset), so a rate given there
        is kept as given (``reg_learning_rate_adapt`` off unless ``d`` sets it too)."""
        names = {f.name for f in fields(cls)}
        for old, new in RENAMED.items():
            if old in d:
                raise ConfigError(f"cofi config: key {old} in {source} was renamed; use {new} "
                                  f"({new}: {', '.join(CHOICES[new])})")
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = [f"{u} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(u, names, 1)) else u for u in unknown]
            raise ConfigError(f"cofi config: unknown key(s) in {source}: {', '.join(hints)}")
        cfg = dataclasses.replace(base) if base is not None else cls()
        for k, v in d.items():
            setattr(cfg, k, _coerce(k, v))
        if user and "reg_learning_rate" in d and "reg_learning_rate_adapt" not in d:
            cfg.reg_learning_rate_adapt = False
        return cfg

    @classmethod
    def load(cls, path: str | Path, base: "TrainConfig | None" = None) -> "TrainConfig":
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"cofi config: file not found: {p}")
        if p.is_dir():
            raise ConfigError(f"cofi config: --config {p} is a folder; give a YAML file")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cofi config: cannot read {p} as text: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"cofi config: {p} is not valid YAML: {_one_line(e)}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"cofi config: {p} must hold a mapping of keys to values")
        return cls.from_dict(d, base, source=str(p), user=True)

    # ------------------------------------------------------------------ validation
    def _validate_device(self) -> None:
        import torch

        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(f"cofi config: device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"cofi config: device {self.device!r}: no CUDA device is available here (use cpu)")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(f"cofi config: device {self.device!r}: only {torch.cuda.device_count()} CUDA "
                                  "device(s) here")
        elif dev.type != "cpu":
            raise ConfigError(f"cofi config: device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"cofi config: precision bf16: device {self.device!r} has no bf16 support (use fp16)")

    def validate(self, command: str = "prune") -> "TrainConfig":
        """Checks every key (ConfigError naming the first bad one); sets target_sparsity to 0.95
        when no budget is given."""
        def bad(name: str, msg: str) -> None:
            raise ConfigError(f"cofi config: {name} {msg}, got {getattr(self, name)!r}")

        if not self.model:
            raise ConfigError("cofi config: model must name a pre-trained checkpoint (folder or hub name)")
        shape = {n: getattr(self, n) for n in TARGET_SHAPE_KEYS if getattr(self, n) is not None}
        for n, v in shape.items():
            if int(v) < 1:
                bad(n, "must be >= 1 or null")
        if shape and self.target_sparsity is not None:
            raise ConfigError(f"cofi config: target_sparsity ({self.target_sparsity}) and a target shape "
                              f"({', '.join(f'{k}={v}' for k, v in shape.items())}) are two budgets; give one "
                              "(--set target_sparsity=null drops a preset's)")
        if not shape and self.target_sparsity is None:
            self.target_sparsity = 0.95
        if self.target_sparsity is not None and not (0.0 <= self.target_sparsity < 1.0):
            bad("target_sparsity", "must be in [0, 1)")
        if not (0.0 <= self.sparsity_epsilon < 1.0):
            bad("sparsity_epsilon", "must be in [0, 1)")
        for n in ("batch_size", "eval_batch_size", "compact_batch_size", "max_seq_length", "eval_steps",
                  "logging_steps", "save_steps", "keep_checkpoints"):
            if int(getattr(self, n)) < 1:
                bad(n, "must be >= 1")
        for n in ("learning_rate", "reg_learning_rate", "compact_learning_rate", "distill_temp"):
            v = getattr(self, n)
            if not (math.isfinite(v) and v > 0):
                bad(n, "must be a positive number")
        for n in ("epochs", "prepruning_epochs", "lagrangian_warmup_epochs", "compact_epochs", "weight_decay",
                  "distill_pred_alpha", "distill_layer_alpha", "ce_alpha", "max_grad_norm"):
            v = getattr(self, n)
            if not (math.isfinite(v) and v >= 0):
                bad(n, "must be >= 0")
        for n in ("max_steps", "prepruning_steps", "lagrangian_warmup_steps", "compact_max_steps"):
            v = getattr(self, n)
            if v is not None and int(v) < 0:
                bad(n, "must be >= 0 or null")
        # 0 would silently mean "all" / "default" here: refuse it
        for n in ("max_train_samples", "max_eval_samples", "max_eval_batches", "num_threads", "num_labels"):
            v = getattr(self, n)
            if v is not None and int(v) < 1:
                bad(n, "must be >= 1 or null")
        for n in ("warmup_steps", "doc_stride"):
            if int(getattr(self, n)) < (1 if n == "doc_stride" else 0):
                bad(n, "must be >= 1" if n == "doc_stride" else "must be >= 0")
        for n in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, n) < 1.0:
                bad(n, "must be in [0, 1)")
        for n, low_open in (("adam_eps", True), ("temperature", True), ("teacher_cache_max_gb", False)):
            v = getattr(self, n)
            if not (math.isfinite(v) and (v > 0 if low_open else v >= 0)):
                bad(n, "must be a positive number" if low_open else "must be >= 0")
        if not 0.0 < self.droprate_init < 1.0:
            bad("droprate_init", "must be in (0, 1)")
        if self.text_fields is not None and not (1 <= len(self.text_fields) <= 2):
            bad("text_fields", "must name one or two columns")
        if self.label_field is not None and not self.label_field:
            bad("label_field", "must name a column")
        self._validate_device()
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            bad("output_dir", "is a file; give a folder (it is created when missing)")
        for n, ok in CHOICES.items():
            if getattr(self, n) not in ok:
                bad(n, f"must be one of {', '.join(ok)}")
        if not self.mask_groups or any(g not in GROUPS for g in self.mask_groups):
            bad("mask_groups", f"must be a non-empty subset of {GROUPS}")
        if self.dropout is not None and not (0.0 <= self.dropout < 1.0):
            bad("dropout", "must be in [0, 1)")
        if command == "prune":
            if self.teacher is None and self.ce_alpha == 0:
                raise ConfigError("cofi config: prune without a teacher needs ce_alpha > 0 "
                                  "(there is nothing else to learn from)")
            if self.teacher is not None and self.distill_pred_alpha == 0 and self.distill_layer_alpha == 0 \
                    and self.ce_alpha == 0:
                raise ConfigError("cofi config: all loss weights are 0 (distill_pred_alpha, distill_layer_alpha, ce_alpha)")
        from ..data.tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError(f"cofi config: task must be one of {', '.join(sorted(TASKS))}, got {self.task!r}")
        return self


# the target-architecture keys (a budget stated as a shape instead of target_sparsity)
TARGET_SHAPE_KEYS = ("target_hidden", "target_heads", "target_ffn", "target_layers")


@dataclass(frozen=True)
class FieldKind:
    """What a config field holds, read from its type annotation.

    base: bool, int, float, str or list (of str); optional: ``X | None``; choices: the values of
    a ``Literal[...]`` (empty for free values); name: the type as error messages spell it.
    """
    base: type
    optional: bool
    choices: tuple[str, ...]
    name: str


def _type_name(t: Any) -> str:
    if t is type(None):
        return "None"
    if get_origin(t) is Literal:
        return "str"
    if get_origin(t) is list:
        return f"list[{', '.join(_type_name(a) for a in get_args(t))}]"
    if get_origin(t) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(t))
    return getattr(t, "__name__", str(t))


def _kind_of(name: str, t: Any) -> FieldKind:
    args = get_args(t) if get_origin(t) in (Union, types.UnionType) else (t,)
    rest = [a for a in args if a is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"cofi.training.config: field {name}: unsupported type {t!r} (one type, optionally | None)")
    (inner,) = rest
    choices: tuple[str, ...] = ()
    if get_origin(inner) is Literal:
        choices = tuple(get_args(inner))
        if not all(isinstance(c, str) for c in choices):
            raise TypeError(f"cofi.training.config: field {name}: Literal values must be strings")
        base: type = str
    elif get_origin(inner) is list:
        if get_args(inner) != (str,):
            raise TypeError(f"cofi.training.config: field {name}: only list[str] is supported, got {inner!r}")
        base = list
    elif inner in (bool, int, float, str):
        base = inner
    else:
        raise TypeError(f"cofi.training.config: field {name}: unsupported type {inner!r}")
    return FieldKind(base, len(rest) != len(args), choices, _type_name(t))


@functools.cache
def field_kinds() -> dict[str, FieldKind]:
    """Every TrainConfig field's :class:`FieldKind`, in field order."""
    hints = get_type_hints(TrainConfig)
    return {f.name: _kind_of(f.name, hints[f.name]) for f in fields(TrainConfig)}


# keys with a fixed set of values (their Literal types)
CHOICES: dict[str, tuple[str, ...]] = {n: k.choices for n, k in field_kinds().items() if k.choices}
# old key -> new key: refused in YAML / --set / flags with a pointer to the new name; a saved
# run's config (checkpoint, config.yaml) is read with the old key mapped (upgrade_saved_config)
RENAMED: dict[str, str] = {"mode": "backend"}


def upgrade_saved_config(d: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config dict with renamed keys under their new names (runs saved before a rename)."""
    if not any(k in d for k in RENAMED):
        return d
    out = {k: v for k, v in d.items() if k not in RENAMED}
    for old, new in RENAMED.items():
        if old in d and new not in d:
            out[new] = d[old]
    return out


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _split_list(text: str) -> list[str]:
    """``a,b`` or ``a+b`` -> ["a", "b"] (blanks dropped)."""
    return [v.strip() for v in text.replace("+", ",").split(",") if v.strip()]


def _coerce(name: str, value: Any) -> Any:
    """Check/convert a value to the field's type (YAML may give ints for floats, strings for numbers)."""
    k = field_kinds()[name]
    if value is None:
        if k.optional:
            return None
        raise ConfigError(f"cofi config: {name} cannot be null")
    try:
        if k.base is list:
            if isinstance(value, str):
                value = _split_list(value)
            return [str(v) for v in value]
        if k.base is bool:
            if isinstance(value, str):
                if value.lower() in _TRUE:
                    return True
                if value.lower() in _FALSE:
                    return False
                raise ValueError(value)
            return bool(value)
        if k.base is float:
            return float(value)
        if k.base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"cofi config: {name} must be of type {k.name}, got {value!r}") from None
