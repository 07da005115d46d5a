"""Every user mistake on the command line ends in one line ``error: ...`` and exit status 2: no
traceback, no silent result. Representative cases of the attack on ``cofi eval/export/finetune/prune``
(missing and damaged files and folders, bad labels, bad option values, bad config files)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "pruning"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "training"))
from _tiny import base_args, make_task, make_tiny_model  # noqa: E402
from masked_forward_ref import random_masks  # noqa: E402

from cofi.cli import main  # noqa: E402


class Fx:
    """Tiny model folders and task files, plus helpers that copy and damage them."""

    def __init__(self, root: Path) -> None:
        from transformers import AutoTokenizer, BertForSequenceClassification

        from cofi.pruning import prune

        self.root = root
        self.hf = make_tiny_model(root / "hf", layers=4)
        model = BertForSequenceClassification.from_pretrained(str(self.hf)).eval()
        self.compact = root / "compact"
        prune(model, random_masks(model.config, False, 1)).save_pretrained(
            str(self.compact), tokenizer=AutoTokenizer.from_pretrained(str(self.hf)))
        self.train, self.dev = make_task(root / "task", n_train=32, n_eval=16)
        self.n = 0

    def path(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{self.n}_{name}"

    def copy(self, src: Path) -> Path:
        d = self.path(src.name)
        shutil.copytree(src, d)
        return d

    def file(self, name: str, text: str | bytes) -> Path:
        p = self.path(name)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def folder(self, name: str) -> Path:
        d = self.path(name)
        d.mkdir()
        return d

    def replace(self, src: Path, name: str, content: str | bytes) -> Path:
        """A copy of ``src`` whose file ``name`` holds ``content``."""
        d = self.copy(src)
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d

    def edit_config(self, src: Path, fn: Callable[[dict], object]) -> Path:
        d = self.copy(src)
        c = json.loads((d / "config.json").read_text())
        fn(c)
        (d / "config.json").write_text(json.dumps(c))
        return d

    def without(self, src: Path, *names: str) -> Path:
        d = self.copy(src)
        for f in os.listdir(d):
            if f in names or "tokenizer" in names and ("tok" in f or "vocab" in f or "special" in f):
                os.remove(d / f)
        return d

    def with_file(self, src: Path, name: str) -> Path:
        d = self.copy(src)
        (d / name).write_bytes(b"")
        return d

    def encoder_only(self) -> Path:
        """A pre-trained encoder folder (BertModel: no classification head)."""
        from transformers import BertModel

        d = self.copy(self.hf)
        BertModel.from_pretrained(str(self.hf)).save_pretrained(str(d))
        return d

    def nan_weight(self, src: Path) -> Path:
        from safetensors.torch import load_file, save_file

        d = self.copy(src)
        sd = load_file(str(d / "model.safetensors"))
        k = next(k for k, v in sd.items() if v.is_floating_point() and "layer" in k)
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = float("nan")
        save_file(sd, str(d / "model.safetensors"))
        return d

    def flip_byte(self, src: Path) -> Path:
        d = self.copy(src)
        b = bytearray((d / "model.safetensors").read_bytes())
        b[-40] ^= 0x10
        (d / "model.safetensors").write_bytes(bytes(b))
        return d

    def dev_labels(self, *labels: str) -> Path:
        lines = self.dev.read_text().splitlines()
        for i, lab in enumerate(labels):
            lines[1 + i] = lines[1 + i].rsplit(",", 1)[0] + "," + lab
        return self.file("dev.csv", "\n".join(lines) + "\n")

    def eval(self, model: Path | None = None, *extra: str, dev: Path | None = None, train: Path | None = None):
        return ["eval", str(model or self.compact), "--task", "custom", "--train-file", str(train or self.train),
                "--eval-file", str(dev or self.dev), *extra]

    def finetune(self, *extra: str, model: Path | None = None, train: Path | None = None):
        return ["finetune", *base_args(model or self.hf, train or self.train, self.dev, self.path("run")),
                "--max-steps", "1", *extra]

    def prune(self, *extra: str, teacher: Path | None = None):
        return ["prune", *base_args(self.hf, self.train, self.dev, self.path("run")), "--max-steps", "2",
                "--prepruning-steps", "0", "--teacher", str(teacher or self.hf), *extra]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return Fx(tmp_path_factory.mktemp("mistakes"))


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda c: c.__setitem__(key, value)


# (id, argv builder, message fragment); every case is a mistake
CASES: list[tuple[str, Callable[[Fx], list[str]], str]] = [
    # ---- cofi eval: model folders
    ("eval-missing-folder", lambda f: f.eval(f.root / "nope"), "not found"),
    ("eval-file-not-folder", lambda f: f.eval(f.dev), "is a file"),
    ("eval-empty-folder", lambda f: f.eval(f.folder("empty")), "is empty"),
    ("eval-no-config", lambda f: f.eval(f.without(f.compact, "config.json")), "no config.json"),
    ("eval-config-not-json", lambda f: f.eval(f.replace(f.compact, "config.json", "{oops")), "not valid JSON"),
    ("eval-config-list", lambda f: f.eval(f.replace(f.compact, "config.json", "[1]")), "JSON object"),
    ("eval-config-num-heads-type", lambda f: f.eval(f.edit_config(f.compact, _set("num_heads", "abc"))), "num_heads"),
    ("eval-config-layers-mismatch", lambda f: f.eval(f.edit_config(f.compact, lambda c: c["ffn_present"].pop())),
     "ffn_present must have"),
    ("eval-config-heads-too-many", lambda f: f.eval(f.edit_config(f.compact, _set("original_num_heads", 1))),
     "original_num_heads=1"),
    ("eval-config-negative-size", lambda f: f.eval(f.edit_config(f.compact, _set("hidden_size", -4))), "hidden_size"),
    ("eval-config-missing-key", lambda f: f.eval(f.edit_config(f.compact, lambda c: c.pop("head_dim"))), "head_dim"),
    ("eval-config-vs-weights", lambda f: f.eval(f.edit_config(f.compact, _set("vocab_size", 99))), "shape"),
    ("eval-config-model-type", lambda f: f.eval(f.edit_config(f.compact, _set("model_type", "gpt2"))), "model_type"),
    ("eval-config-eps-type", lambda f: f.eval(f.edit_config(f.compact, _set("layer_norm_eps", "abc"))), "layer_norm_eps"),
    ("eval-weights-missing", lambda f: f.eval(f.without(f.compact, "model.safetensors")), "no model.safetensors"),
    ("eval-weights-garbage", lambda f: f.eval(f.replace(f.compact, "model.safetensors", b"\x00" * 99)),
     "not a readable safetensors"),
    ("eval-weights-nan", lambda f: f.eval(f.nan_weight(f.compact)), "NaN/inf"),
    ("eval-weights-byte-flip", lambda f: f.eval(f.flip_byte(f.compact)), "checksum"),
    ("eval-encoder-no-head", lambda f: f.eval(f.encoder_only()), "no task head"),
    ("eval-neither-folder", lambda f: f.eval(f.edit_config(f.hf, _set("model_type", "gpt2"))), "neither a compact"),
    ("eval-pruning-checkpoint", lambda f: f.eval(f.with_file(f.hf, "masks.safetensors")), "pruning checkpoint"),
    ("eval-full-pad", lambda f: f.eval(f.hf, "--pad", "16"), "--pad applies to compact"),
    ("eval-no-tokenizer", lambda f: f.eval(f.without(f.compact, "tokenizer")), "no tokenizer files"),
    ("eval-tokenizer-missing", lambda f: f.eval(f.without(f.compact, "tokenizer"), "--tokenizer", str(f.root / "no")),
     "no such folder"),
    # ---- cofi eval: data and options
    ("eval-unknown-task", lambda f: f.eval(None, "--task", "nope"), "unknown task"),
    ("eval-qa-task", lambda f: ["eval", str(f.compact), "--task", "squad"], "question answering"),
    ("eval-missing-eval-file", lambda f: f.eval(dev=f.root / "nope.csv"), "file not found"),
    ("eval-only-train-file", lambda f: ["eval", str(f.compact), "--task", "custom", "--train-file", str(f.train)],
     "--train-file only maps"),
    ("eval-task-record-damaged", lambda f: ["eval", str(f.edit_config(f.compact, _set("task_spec", {"name": 3})))],
     "task_spec is damaged"),
    ("eval-no-task-recorded", lambda f: ["eval", str(f.compact), "--eval-file", str(f.dev)], "--task is needed"),
    ("eval-custom-no-file", lambda f: ["eval", str(f.compact), "--task", "custom"], "give --eval-file"),
    ("eval-missing-column", lambda f: f.eval(None, "--text-fields", "text"), "lacks column(s) ['text']"),
    ("eval-missing-label-column", lambda f: f.eval(None, "--label-field", "y"), "set --text-fields and --label-field"),
    ("eval-three-text-fields", lambda f: f.eval(None, "--text-fields", "a,b,c"), "one or two columns"),
    ("eval-num-labels-mismatch", lambda f: f.eval(None, "--num-labels", "3"), "--num-labels 3 but the model"),
    ("eval-empty-file", lambda f: f.eval(dev=f.file("e.csv", "")), "is empty"),
    ("eval-header-only", lambda f: f.eval(dev=f.file("h.csv", "sentence,label\n")), "no rows"),
    ("eval-file-is-folder", lambda f: f.eval(dev=f.folder("d.csv")), "is a folder"),
    ("eval-binary-file", lambda f: f.eval(dev=f.file("b.csv", bytes(range(256)) * 4)), "cannot read"),
    ("eval-bad-json", lambda f: f.eval(dev=f.file("b.json", '{"data": [1,')), "cannot read"),
    ("eval-empty-label", lambda f: f.eval(dev=f.dev_labels("")), "row 1 (line 2): label '' is empty"),
    ("eval-text-label", lambda f: f.eval(dev=f.dev_labels("1", "x")), "row 2 (line 3): label 'x'"),
    ("eval-float-label", lambda f: f.eval(dev=f.dev_labels("1.7")), "label 1.7 is not an integer"),
    ("eval-label-too-big", lambda f: f.eval(dev=f.dev_labels("2")), "outside [0, 2): the model in"),
    ("eval-names-vs-ints", lambda f: f.eval(dev=f.file("n.csv", "sentence,label\ngood,pos\n")), "integer class ids"),
    ("eval-limit-negative", lambda f: f.eval(None, "--limit", "-5"), "--limit"),
    ("eval-limit-zero", lambda f: f.eval(None, "--limit", "0"), "--limit"),
    ("eval-batch-size-zero", lambda f: f.eval(None, "--batch-size", "0"), "--batch-size"),
    ("eval-max-length-zero", lambda f: f.eval(None, "--max-length", "0"), "--max-length"),
    ("eval-max-length-too-long", lambda f: f.eval(None, "--max-length", "1000"), "positions"),
    ("eval-pad-negative", lambda f: f.eval(None, "--pad", "-8"), "--pad"),
    ("eval-unknown-option", lambda f: f.eval(None, "--limt", "3"), "unrecognized"),
    # ---- cofi export
    ("export-missing-folder", lambda f: ["export", str(f.root / "nope")], "not found"),
    ("export-nan", lambda f: ["export", str(f.nan_weight(f.compact)), "--no-check"], "NaN/inf"),
    ("export-out-is-folder", lambda f: ["export", str(f.compact), "--out", str(f.root)], "is a folder"),
    # ---- cofi finetune / prune: models
    ("ft-model-missing", lambda f: f.finetune(model=f.root / "nope"), "no such folder"),
    ("ft-model-file", lambda f: f.finetune(model=f.dev), "is a file"),
    ("ft-model-no-tokenizer", lambda f: f.finetune(model=f.without(f.hf, "tokenizer")), "no tokenizer files"),
    ("ft-model-config-not-json", lambda f: f.finetune(model=f.replace(f.hf, "config.json", "{")), "JSON"),
    ("ft-model-compact", lambda f: f.finetune(model=f.compact), "compact (pruned) model folder"),
    ("ft-model-type", lambda f: f.finetune(model=f.edit_config(f.hf, _set("model_type", "gpt2"))), "gpt2"),
    ("ft-model-no-weights", lambda f: f.finetune(model=f.without(f.hf, "model.safetensors")), "cannot load model"),
    ("ft-model-nan", lambda f: f.finetune(model=f.nan_weight(f.hf)), "NaN/inf"),
    ("ft-max-seq-too-long", lambda f: f.finetune("--max-seq-length", "1000"), "positions"),
    ("prune-teacher-missing", lambda f: f.prune(teacher=f.root / "nope"), "not found"),
    ("prune-teacher-nan", lambda f: f.prune(teacher=f.nan_weight(f.hf)), "NaN/inf"),
    # ---- cofi finetune / prune: data, config and values
    ("ft-train-empty-label", lambda f: f.finetune(train=f.file("t.csv", "sentence,label\ngood,1\nbad,\n")),
     "row 2 (line 3): label '' is empty"),
    ("ft-train-float-label", lambda f: f.finetune(train=f.file("t.csv", "sentence,label\ngood,1\nbad,0.5\n")),
     "label 0.5 is not an integer"),
    ("ft-label-field-text", lambda f: f.finetune("--label-field", "sentence"), "distinct label names"),
    ("ft-config-missing", lambda f: f.finetune("--config", str(f.root / "no.yaml")), "file not found"),
    ("ft-config-not-mapping", lambda f: f.finetune("--config", str(f.file("c.yaml", "- 1\n"))), "mapping"),
    ("ft-config-bad-yaml", lambda f: f.finetune("--config", str(f.file("c.yaml", "a: [1\n"))), "not valid YAML"),
    ("ft-config-unknown-key", lambda f: f.finetune("--config", str(f.file("c.yaml", "learning_rat: 1\n"))),
     "did you mean learning_rate"),
    ("ft-config-is-folder", lambda f: f.finetune("--config", str(f.root)), "is a folder"),
    ("ft-set-no-equals", lambda f: f.finetune("--set", "max_steps"), "key=value"),
    ("ft-set-bad-yaml", lambda f: f.finetune("--set", "batch_size=[1"), "not valid YAML"),
    ("ft-set-unknown", lambda f: f.finetune("--set", "nope=1"), "unknown key"),
    ("ft-unknown-task", lambda f: f.finetune("--task", "nope"), "task must be one of"),
    ("ft-batch-size-zero", lambda f: f.finetune("--batch-size", "0"), "batch_size"),
    ("ft-max-steps-float", lambda f: f.finetune("--max-steps", "1.5"), "max_steps"),
    ("ft-warmup-negative", lambda f: f.finetune("--warmup-steps", "-1"), "warmup_steps"),
    ("ft-adam-beta", lambda f: f.finetune("--adam-beta1", "1.5"), "adam_beta1"),
    ("ft-num-threads-zero", lambda f: f.finetune("--num-threads", "0"), "num_threads"),
    ("ft-max-eval-samples-zero", lambda f: f.finetune("--max-eval-samples", "0"), "max_eval_samples"),
    ("ft-device-bad", lambda f: f.finetune("--device", "foo"), "device"),
    ("ft-output-dir-file", lambda f: f.finetune("--output-dir", str(f.dev)), "output_dir"),
    ("prune-target-one", lambda f: f.prune("--target-sparsity", "1.0"), "target_sparsity"),
    ("prune-target-percent", lambda f: f.prune("--target-sparsity", "95"), "target_sparsity"),
    ("prune-droprate", lambda f: f.prune("--droprate-init", "1.5"), "droprate_init"),
    ("prune-temperature", lambda f: f.prune("--temperature", "0"), "temperature"),
]


@pytest.mark.parametrize("name,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_clean_line(fx, capsys, name, argv, fragment):
    args = argv(fx)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    # transformers' own "Loading weights" progress bar may come first; the error is the last line
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert rc == 2, (rc, out[-500:], err[-500:])
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert fragment in lines[0], lines[0]


def test_good_invocations_still_work(fx, capsys):
    """The same fixtures, used right: eval runs, with the model's tokenizer given explicitly too, with
    the eval file alone (integer labels need no training data), and on the full (unpruned) model."""
    for args in (fx.eval(None, "--limit", "5"), fx.eval(fx.without(fx.compact, "tokenizer"), "--tokenizer", str(fx.hf)),
                 ["eval", str(fx.compact), "--task", "custom", "--eval-file", str(fx.dev)], fx.eval(fx.hf)):
        assert main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["n"] in (5, 16) and 0 <= report["accuracy"] <= 1
        assert report["model"] == ("full" if args[1] == str(fx.hf) else "compact")


def test_nonfinite_logits_are_refused(fx):
    """Weights that load but overflow on real inputs give no prediction (and so no metric)."""
    from cofi.runtime import CompactModel, predict
    from cofi.runtime.inference import NonFiniteOutputError

    m = CompactModel.from_pretrained(str(fx.compact))
    with torch.no_grad():
        m.classifier.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteOutputError, match="NaN/inf outputs for 2 of 2"):
        predict(m, [{"input_ids": [2, 5, 3]}, {"input_ids": [2, 6, 7, 3]}])
