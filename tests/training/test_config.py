"""cofi.training.config: typed keys (read from the annotations), help texts, precedence, --help."""
from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Literal

import pytest

from cofi.training import config as C
from cofi.training import config_cli as CC
from cofi.training.config import ConfigError, TrainConfig
from cofi.training.config_cli import add_config_arguments, resolve

KEYS = [f.name for f in fields(TrainConfig)]


def _parse(*argv: str, command: str = "prune") -> TrainConfig:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(p, command=command)
    return resolve(p.parse_args(["--model", "m", "--teacher", "t", *argv]), command)


def _flag_error(*argv: str) -> str:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(p)
    with pytest.raises(argparse.ArgumentError) as e:
        p.parse_args(list(argv))
    return str(e.value)


# ---------------------------------------------------------------------- help texts
def test_every_field_has_one_line_help():
    for f in fields(TrainConfig):
        h = f.metadata.get("help")
        assert isinstance(h, str) and h.strip() and "\n" not in h, f.name


def test_choice_keys_are_the_literal_types_and_validate_checks_them():
    assert C.CHOICES == {"scheduler": ("linear", "constant"), "compact_scheduler": ("linear", "constant"),
                         "mask_init": ("reference", "uniform"), "deterministic_mode": ("soft", "binary"),
                         "backend": ("compact", "dense"), "layer_distill": ("v3", "v4", "none"),
                         "teacher_cache": ("auto", "on", "off"), "precision": ("fp32", "bf16", "fp16")}
    for name, ok in C.CHOICES.items():
        assert f"one of {', '.join(ok)}" in CC.field_help(name)
        with pytest.raises(ConfigError, match=f"{name} must be one of {', '.join(ok)}, got 'nope'"):
            _parse("--set", f"{name}=nope")


@pytest.mark.parametrize("command", ["prune", "finetune", "demo"])
def test_help_exits_0_and_lists_every_key(command, capsys):
    from cofi.cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") + " " in out, f.name
        if f.name != "overwrite":  # --overwrite keeps its own longer help
            assert " ".join(f.metadata["help"].split()) in out, f.name
    assert "{compact,dense}" in out and "--mode " not in out and "--mode]" not in out


def test_help_shows_the_commands_defaults():
    def shown(command: str, preset: str | None = None) -> str:
        p = argparse.ArgumentParser()
        add_config_arguments(p, command=command, preset=preset)
        return " ".join(p.format_help().split())

    assert "(default: 20.0)" in shown("prune").split("--epochs FLOAT ", 1)[1][:120]
    assert "(default: 5)" in shown("finetune").split("--epochs FLOAT ", 1)[1][:120]  # preset teacher
    assert "(default: rotten_tomatoes)" in shown("prune", "demo").split("--task TEXT ", 1)[1][:160]
    assert "(default: hidden,head,mha,intermediate,ffn)" in shown("prune")


# ---------------------------------------------------------------------- typing
def test_field_kinds_from_annotations():
    k = C.field_kinds()
    assert set(k) == set(KEYS)
    assert (k["max_steps"].base, k["max_steps"].optional, k["max_steps"].name) == (int, True, "int | None")
    assert (k["batch_size"].base, k["batch_size"].optional, k["batch_size"].name) == (int, False, "int")
    assert (k["learning_rate"].base, k["learning_rate"].name) == (float, "float")
    assert (k["dropout"].base, k["dropout"].optional) == (float, True)
    assert (k["progress"].base, k["freeze_embeddings"].optional) == (bool, True)
    assert (k["mask_groups"].base, k["mask_groups"].name) == (list, "list[str]")
    assert (k["text_fields"].base, k["text_fields"].optional, k["text_fields"].name) == (list, True, "list[str] | None")
    assert (k["backend"].base, k["backend"].choices) == (str, ("compact", "dense"))
    assert (k["tokenizer"].base, k["tokenizer"].optional, k["task"].optional) == (str, True, False)


@pytest.mark.parametrize("t", [dict[str, int], list[int], int | float, Literal[1, 2], tuple])
def test_unsupported_annotations_are_refused(t):
    with pytest.raises(TypeError, match="field x"):
        C._kind_of("x", t)


def test_optional_int():
    assert _parse("--max-steps", "5").max_steps == 5
    assert _parse("--max-steps", "5", "--set", "max_steps=null").max_steps is None
    assert _parse("--set", "max_steps=7.0").max_steps == 7
    assert "max_steps must be of type int | None, got '1.5'" in _flag_error("--max-steps", "1.5")
    with pytest.raises(ConfigError, match=r"max_steps must be of type int \| None, got 1.5"):
        _parse("--set", "max_steps=1.5")
    with pytest.raises(ConfigError, match="batch_size cannot be null"):
        _parse("--set", "batch_size=null")


def test_float():
    cfg = _parse("--learning-rate", "3e-5", "--set", "reg_learning_rate=1")
    assert cfg.learning_rate == 3e-5
    assert cfg.reg_learning_rate == 1.0 and type(cfg.reg_learning_rate) is float
    assert "learning_rate must be of type float, got 'fast'" in _flag_error("--learning-rate", "fast")


@pytest.mark.parametrize("text,want", [("true", True), ("false", False), ("yes", True), ("no", False),
                                       ("1", True), ("0", False), ("On", True), ("OFF", False)])
def test_bool_flags(text, want):
    cfg = _parse("--progress", text, "--skip-compact", text, "--freeze-embeddings", text)
    assert cfg.progress is want and cfg.skip_compact is want and cfg.freeze_embeddings is want


def test_bool_errors_and_yaml():
    assert "progress must be of type bool, got 'maybe'" in _flag_error("--progress", "maybe")
    assert _parse("--set", "progress=false").progress is False
    assert _parse("--set", "group_by_length=off").group_by_length is False  # YAML 1.1 bool
    assert _parse().freeze_embeddings is True and _parse(command="finetune").freeze_embeddings is False


def test_lists():
    assert _parse("--mask-groups", "hidden+head").mask_groups == ["hidden", "head"]
    assert _parse("--mask-groups", "head,ffn,").mask_groups == ["head", "ffn"]
    assert _parse("--set", "mask_groups=[head, ffn]").mask_groups == ["head", "ffn"]
    assert _parse("--set", "mask_groups=head, ffn").mask_groups == ["head", "ffn"]
    assert _parse("--text-fields", "a,b").text_fields == ["a", "b"]
    assert _parse("--set", "text_fields=null").text_fields is None
    with pytest.raises(ConfigError, match=r"mask_groups must be of type list\[str\], got 5"):
        _parse("--set", "mask_groups=5")
    with pytest.raises(ConfigError, match="mask_groups must be a non-empty subset"):
        _parse("--mask-groups", "head,nope")


def test_strings_from_yaml_scalars():
    assert _parse("--set", "teacher_cache=off").teacher_cache == "off"  # YAML reads off as False
    assert _parse("--set", "eval_split=2").eval_split == "2"


# ---------------------------------------------------------------------- precedence
def test_precedence_defaults_preset_config_flags_set(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 7\nlearning_rate: 1.0e-4\nbatch_size: 8\n")
    base = _parse()
    assert (base.epochs, base.prepruning_epochs, base.learning_rate, base.batch_size) == (20.0, 1.0, 2e-5, 32)
    cfg = _parse("--preset", "glue-small")  # preset over defaults
    assert (cfg.epochs, cfg.prepruning_epochs) == (100, 4)
    cfg = _parse("--preset", "glue-small", "--config", str(y))  # --config over the preset
    assert (cfg.epochs, cfg.prepruning_epochs, cfg.learning_rate, cfg.batch_size) == (7, 4, 1e-4, 8)
    cfg = _parse("--preset", "glue-small", "--config", str(y), "--epochs", "3", "--batch-size", "4")  # flags over it
    assert (cfg.epochs, cfg.learning_rate, cfg.batch_size) == (3, 1e-4, 4)
    cfg = _parse("--set", "epochs=9", "--preset", "glue-small", "--config", str(y), "--epochs", "3")  # --set last
    assert cfg.epochs == 9
    cfg = _parse("--set", "epochs=9", "--set", "epochs=11")  # later --set wins
    assert cfg.epochs == 11


def test_finetune_starts_from_preset_teacher():
    assert _parse(command="finetune").epochs == 5
    assert _parse("--preset", "glue-small", command="finetune").epochs == 100  # an explicit preset over it
    assert _parse("--epochs", "2", command="finetune").epochs == 2


# ---------------------------------------------------------------------- backend (was mode)
def test_old_mode_key_is_refused_with_the_new_name(tmp_path):
    assert _parse("--backend", "dense").backend == "dense"
    assert "renamed to --backend (compact, dense)" in _flag_error("--mode", "dense")  # not --model
    with pytest.raises(ConfigError, match="key mode in --set was renamed; use backend"):
        _parse("--set", "mode=dense")
    y = tmp_path / "c.yaml"
    y.write_text("mode: dense\n")
    with pytest.raises(ConfigError, match="was renamed; use backend"):
        _parse("--config", str(y))


def test_saved_config_with_mode_reads_as_backend():
    saved = TrainConfig(model="m").to_dict()
    saved["mode"] = saved.pop("backend")
    assert C.upgrade_saved_config(saved) == TrainConfig(model="m").to_dict()
    now = TrainConfig(model="m").to_dict()
    assert C.upgrade_saved_config(now) is now
