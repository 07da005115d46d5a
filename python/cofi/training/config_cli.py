"""The command line of a run: presets, ``--<key>`` flags with help, ``--config`` and ``--set``,
resolved into one :class:`~cofi.training.config.TrainConfig`.

Precedence (later wins): dataclass defaults < ``--preset`` < ``--config file.yaml`` < CLI flags
(``--learning-rate 3e-5``) < ``--set key=value`` (YAML-typed).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import fields
from typing import Any

import yaml

from .config import CHOICES, RENAMED, ConfigError, TrainConfig, _coerce, _one_line, field_kinds

# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipes (docs/cofi-reference.md 4.2): bs 32, lr 2e-5 (SQuAD bs 16, 3e-5), reg lr 0.01,
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
                 max_seq_length=64, eval_steps=100, save_steps=100, logging_steps=10,
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
    cfg = TrainConfig.from_dict(explicit, cfg, "command line", user=True)
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"cofi config: --set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"cofi config: --set {item!r}: the value is not valid YAML: {_one_line(e)}") from None
        cfg = TrainConfig.from_dict({k.strip().replace("-", "_"): value}, cfg, "--set", user=True)
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


def _list_arg(v: str) -> list[str]:
    """A list flag: ``a,b`` or ``a+b`` (empty items dropped; the items are checked by validate)."""
    return [x for x in v.replace("+", ",").split(",") if x]


def _renamed(old: str, new: str):
    def conv(v: str):
        raise argparse.ArgumentTypeError(f"renamed to --{new} ({', '.join(CHOICES[new])})")

    conv.__name__ = old
    return conv


_METAVAR = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT", list: "A,B"}


def _shown(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(v)
    return str(v)


def field_help(name: str, default: Any = dataclasses.MISSING) -> str:
    """The ``--help`` line of a config key: its help text, allowed values and default."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    k = field_kinds()[name]
    if default is dataclasses.MISSING:
        default = getattr(TrainConfig(), name)
    text = f.metadata["help"]
    if k.choices:
        text += f"; one of {', '.join(k.choices)}"
    elif k.base is bool:
        text += "; true or false"
    return f"{text} (default: {_shown(default)})"


def add_config_arguments(parser: argparse.ArgumentParser, command: str = "prune", preset: str | None = None) -> None:
    """--preset, --config, --set and one ``--<field>`` flag per config field (default None = unset).

    The help shows each key's default for ``command`` (finetune starts from preset teacher) and
    ``preset`` (the one a command applies when none is given, e.g. cofi demo's)."""
    parser.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    parser.add_argument("--config", help="YAML file with config keys (overrides the preset)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any key (YAML value)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in output_dir")
    parser.add_argument("--overwrite", dest="overwrite", action="store_const", const=True, default=None,
                        help="delete the previous run's outputs in output_dir first (without it a non-empty output_dir is refused)")
    for old, new in RENAMED.items():  # else argparse would read --mode as an abbreviation of --model
        parser.add_argument("--" + old, dest=f"_renamed_{old}", default=None, help=argparse.SUPPRESS,
                            type=_renamed(old, new))
    shown = TrainConfig().to_dict()
    for p in (["teacher"] if command == "finetune" else []) + ([preset] if preset else []):
        shown.update(PRESETS[p])
    g = parser.add_argument_group(
        "config keys", "each is also a YAML key (--config) and a --set KEY=VALUE key; later wins: defaults < "
                       "--preset < --config < these flags < --set")
    for f in fields(TrainConfig):
        if f.name == "overwrite":
            continue
        k = field_kinds()[f.name]
        flag = "--" + f.name.replace("_", "-")
        metavar = "{" + ",".join(k.choices) + "}" if k.choices else _METAVAR[k.base]
        conv = _list_arg if k.base is list else _arg(f.name)
        g.add_argument(flag, dest=f.name, default=None, type=conv, metavar=metavar,
                       help=field_help(f.name, shown[f.name]).replace("%", "%%"))
