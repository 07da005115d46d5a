"""One dataclass per run: YAML in/out, presets, CLI overrides, validation with clear errors.

Precedence (later wins): dataclass defaults < ``--preset`` < ``--config file.yaml`` < CLI flags
(``--learning-rate 3e-5``) < ``--set key=value`` (YAML-typed). The resolved config is saved with
every checkpoint and as ``config.yaml`` in the output folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import UserError


class ConfigError(UserError):
    """A run configuration is invalid; the message names the field, the value and what is allowed."""


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- task and data
    task: str = "sst2"
    train_file: str | None = None
    eval_file: str | None = None
    eval_split: str | None = None
    text_fields: list[str] | None = None
    label_field: str | None = None
    num_labels: int | None = None
    max_seq_length: int = 128
    doc_stride: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    group_by_length: bool = True
    # ---------------------------------------------------------------- models
    model: str = ""                 # pre-trained checkpoint the student (or the teacher to fine-tune) starts from
    teacher: str | None = None      # fine-tuned teacher folder (prune); None = no distillation
    tokenizer: str | None = None    # tokenizer folder or hub name; None = the one in ``model``
    output_dir: str = "runs/cofi"
    # ---------------------------------------------------------------- optimisation (teacher fine-tuning / pruning)
    batch_size: int = 32
    eval_batch_size: int = 64
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    epochs: float = 20.0
    max_steps: int | None = None    # overrides epochs when set
    scheduler: str = "linear"       # linear | constant
    freeze_embeddings: bool | None = None  # None: True for prune (reference), False for finetune
    dropout: float | None = None    # None: the checkpoint's own dropout
    # ---------------------------------------------------------------- CoFi
    target_sparsity: float = 0.95
    sparsity_epsilon: float = 0.01
    prepruning_epochs: float = 1.0
    prepruning_steps: int | None = None
    lagrangian_warmup_epochs: float = 2.0
    lagrangian_warmup_steps: int | None = None
    reg_learning_rate: float = 0.01
    mask_groups: list[str] = field(default_factory=lambda: ["hidden", "head", "mha", "intermediate", "ffn"])
    mask_init: str = "reference"    # reference | uniform (cofi.masks.INIT_PRESETS)
    droprate_init: float = 0.5
    temperature: float = 2.0 / 3.0
    deterministic_mode: str = "soft"  # soft (reference) | binary
    backend: str = "compact"        # compact (our cheap steps) | dense (the reference's method)
    # ---------------------------------------------------------------- distillation
    distill_temp: float = 2.0
    distill_pred_alpha: float = 0.5
    distill_layer_alpha: float = 0.5
    layer_distill: str = "v3"       # v3 | v4 | none
    ce_alpha: float = 0.0           # optional ground-truth CE term while distilling
    teacher_cache: str = "auto"     # auto | on | off: teacher outputs per example from one pass (teacher_cache.py)
    teacher_cache_max_gb: float = 4.0  # auto: per-step teacher forward above this cache size
    # ---------------------------------------------------------------- stage 2: fine-tune the compact model
    compact_epochs: float = 20.0
    compact_max_steps: int | None = None
    compact_learning_rate: float = 1e-5
    compact_batch_size: int = 64
    compact_scheduler: str = "constant"
    skip_compact: bool = False
    # ---------------------------------------------------------------- eval, logging, checkpoints
    eval_steps: int = 500
    logging_steps: int = 50
    save_steps: int = 500
    keep_checkpoints: int = 2
    metric_for_best: str | None = None  # default: the task's primary metric
    seed: int = 57
    num_threads: int | None = None
    progress: bool = True
    device: str = "cpu"
    max_eval_batches: int | None = None
    # run control, not saved with the run: clear a previous run's outputs in output_dir first
    overwrite: bool = False

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: "TrainConfig | None" = None, source: str = "config") -> "TrainConfig":
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
        return cls.from_dict(d, base, source=str(p))

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

    def validate(self, command: str = "prune") -> "TrainConfig":
        def bad(name: str, msg: str) -> None:
            raise ConfigError(f"cofi config: {name} {msg}, got {getattr(self, name)!r}")

        if not self.model:
            raise ConfigError("cofi config: model must name a pre-trained checkpoint (folder or hub name)")
        if not (0.0 <= self.target_sparsity < 1.0):
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
        groups = ("hidden", "head", "mha", "intermediate", "ffn")
        if not self.mask_groups or any(g not in groups for g in self.mask_groups):
            bad("mask_groups", f"must be a non-empty subset of {groups}")
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


# keys with a fixed set of values
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": ("linear", "constant"), "compact_scheduler": ("linear", "constant"),
    "deterministic_mode": ("soft", "binary"), "backend": ("compact", "dense"),
    "layer_distill": ("v3", "v4", "none"), "mask_init": ("reference", "uniform"),
    "teacher_cache": ("auto", "on", "off")}
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


def _field_types() -> dict[str, Any]:
    return get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """Check/convert a value to the field's type (YAML may give ints for floats, strings for numbers)."""
    t = _field_types()[name]
    s = str(t)
    if value is None:
        if "None" in s:
            return None
        raise ConfigError(f"cofi config: {name} cannot be null")
    try:
        if "list" in s:
            if isinstance(value, str):
                value = [v.strip() for v in value.replace("+", ",").split(",") if v.strip()]
            return [str(v) for v in value]
        if "bool" in s:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if "float" in s:
            return float(value)
        if "int" in s:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(value, bool):  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        return str(value)
    except (TypeError, ValueError):
        kind = s.replace("typing.", "").replace("<class '", "").replace("'>", "")
        raise ConfigError(f"cofi config: {name} must be of type {kind}, got {value!r}") from None


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipes (cofi-reference.md 4.2): bs 32, lr 2e-5 (SQuAD bs 16, 3e-5), reg lr 0.01,
    # T=2, 20 pruning epochs (100 small GLUE), pre-pruning 1 epoch (4), warm-up 2 epochs (20),
    # compact fine-tuning 20 epochs at bs 64 with a constant lr.
    "glue-large": dict(batch_size=32, learning_rate=2e-5, epochs=20, prepruning_epochs=1, lagrangian_warmup_epochs=2,
                       reg_learning_rate=0.01, distill_temp=2.0, eval_steps=500, save_steps=500, max_seq_length=128,
                       compact_epochs=20, compact_batch_size=64, compact_learning_rate=1e-5, compact_scheduler="constant"),
    "glue-small": dict(batch_size=32, learning_rate=2e-5, epochs=100, prepruning_epochs=4, lagrangian_warmup_epochs=20,
                       reg_learning_rate=0.01, distill_temp=2.0, eval_steps=50, save_steps=200, max_seq_length=128,
                       compact_epochs=20, compact_batch_size=64, compact_learning_rate=1e-5, compact_scheduler="constant"),
    "squad": dict(task="squad", batch_size=16, learning_rate=3e-5, epochs=20, prepruning_epochs=1,
                  lagrangian_warmup_epochs=2, reg_learning_rate=0.01, distill_temp=2.0, eval_steps=500, save_steps=500,
                  max_seq_length=384, doc_stride=128, compact_epochs=20, compact_batch_size=16,
                  compact_learning_rate=3e-5, compact_scheduler="constant"),
    # Teacher fine-tuning (scripts/run_FT.sh): bs 32, lr 2e-5, 5 epochs.
    "teacher": dict(batch_size=32, learning_rate=2e-5, epochs=5, scheduler="linear", eval_steps=500, save_steps=500),
    # Small CPU runs: short schedules that show the whole loop in minutes on 2 cores.
    "cpu-small": dict(batch_size=32, learning_rate=5e-5, epochs=3, prepruning_epochs=0.25, lagrangian_warmup_epochs=1.5,
                      reg_learning_rate=0.05, eval_steps=100, save_steps=100, logging_steps=10, max_seq_length=64,
                      compact_epochs=1, compact_batch_size=32, compact_learning_rate=3e-5, layer_distill="v3"),
    # The default job (cofi demo): MiniLM-L6 on Rotten Tomatoes; see cofi.pipeline.
    "demo": dict(task="rotten_tomatoes", batch_size=32, eval_batch_size=128, learning_rate=1e-4, epochs=2,
                 prepruning_steps=40, lagrangian_warmup_epochs=1.0, reg_learning_rate=0.1, target_sparsity=0.9,
                 sparsity_epsilon=0.02, max_seq_length=64, eval_steps=100, save_steps=100, logging_steps=10,
                 compact_epochs=1, compact_batch_size=32, compact_learning_rate=1e-4, compact_scheduler="linear",
                 distill_pred_alpha=0.5, distill_layer_alpha=0.5, ce_alpha=0.0),
}


def resolve(args: argparse.Namespace, command: str) -> TrainConfig:
    """defaults < preset < --config < explicit flags < --set; then validate."""
    cfg = TrainConfig()
    if command == "finetune":
        cfg = TrainConfig.from_dict(PRESETS["teacher"], cfg, "preset teacher")
    preset = getattr(args, "preset", None)
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"cofi config: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        cfg = TrainConfig.from_dict(PRESETS[preset], cfg, f"preset {preset}")
    if getattr(args, "config", None):
        cfg = TrainConfig.load(args.config, cfg)
    explicit = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                if getattr(args, f.name, None) is not None}
    cfg = TrainConfig.from_dict(explicit, cfg, "command line")
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"cofi config: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"cofi config: --set {item!r}: the value is not valid YAML: {_one_line(e)}") from None
        cfg = TrainConfig.from_dict({k.strip().replace("-", "_"): value}, cfg, "--set")
    if cfg.freeze_embeddings is None:
        cfg.freeze_embeddings = command != "finetune"
    return cfg.validate(command)


def _arg(name: str):
    def conv(v: str):
        try:
            return _coerce(name, v)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = name
    return conv


def _renamed(old: str, new: str):
    def conv(v: str):
        raise argparse.ArgumentTypeError(f"renamed to --{new} ({', '.join(CHOICES[new])})")

    conv.__name__ = old
    return conv


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, --config, --set and one ``--<field>`` flag per config field (default None = unset)."""
    parser.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", help="YAML file with config keys (overrides the preset)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any key (YAML value)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in output_dir")
    parser.add_argument("--overwrite", dest="overwrite", action="store_const", const=True, default=None,
                        help="delete the previous run's outputs in output_dir first (without it a non-empty output_dir is refused)")
    for old, new in RENAMED.items():  # else argparse would read --mode as an abbreviation of --model
        parser.add_argument("--" + old, dest=f"_renamed_{old}", default=None, help=argparse.SUPPRESS,
                            type=_renamed(old, new))
    g = parser.add_argument_group("config keys (see cofi.training.config.TrainConfig)")
    hints = _field_types()
    for f in fields(TrainConfig):
        if f.name == "overwrite":
            continue
        s = str(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if "bool" in s:
            g.add_argument(flag, dest=f.name, default=None, type=_arg(f.name), metavar="BOOL")
        elif "list" in s:
            g.add_argument(flag, dest=f.name, default=None, type=lambda v: [x for x in v.replace("+", ",").split(",") if x])
        else:
            g.add_argument(flag, dest=f.name, default=None, type=_arg(f.name))
