"""cofi.runtime: save/load, padding, batch inference, torch.compile, torch.export and ONNX."""
from __future__ import annotations

import json
import os
import pickle
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
from masked_forward_ref import random_masks, tiny_hf_model  # noqa: E402

from cofi.errors import UserError  # noqa: E402
from cofi.pruning import prune  # noqa: E402
from cofi.runtime import CompactModel, predict  # noqa: E402
from cofi.runtime.export import example_inputs, export_onnx, export_program  # noqa: E402


def _compact(arch="bert", task="cls", dtype=torch.float32, soft=True, seed=1):
    model = tiny_hf_model(arch, task, dtype, num_labels=3 if task == "cls" else 2)
    return prune(model, random_masks(model.config, soft, seed))


def _outs(o):
    return (o.logits,) if o.logits is not None else (o.start_logits, o.end_logits)


def _tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


@pytest.mark.parametrize("arch,task,dtype", [("bert", "cls", torch.float32), ("roberta", "qa", torch.float64)])
def test_save_load_roundtrip_never_unpickles(tmp_path, monkeypatch, arch, task, dtype):
    c = _compact(arch, task, dtype)
    tok = _tokenizer(tmp_path) if arch == "bert" else None
    out_dir = tmp_path / "compact"
    c.save_pretrained(str(out_dir), tokenizer=tok)
    files = set(os.listdir(out_dir))
    assert {"model.safetensors", "config.json"} <= files
    if tok is not None:
        assert "tokenizer_config.json" in files and ("vocab.txt" in files or "tokenizer.json" in files)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["num_heads"] == c.config.num_heads and cfg["intermediate_sizes"] == c.config.intermediate_sizes

    def no_unpickle(*a, **k):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickle)
    monkeypatch.setattr(pickle, "load", no_unpickle)
    monkeypatch.setattr(pickle, "loads", no_unpickle)
    loaded = CompactModel.from_pretrained(str(out_dir))
    assert loaded.config == c.config
    assert next(loaded.parameters()).dtype == dtype
    inp = example_inputs(c, batch=3, seq=10)
    with torch.no_grad():
        for a, b in zip(_outs(c(*inp)), _outs(loaded(*inp))):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_from_pretrained_missing_weights(tmp_path):
    c = _compact()
    c.config.save(str(tmp_path))
    with pytest.raises(UserError, match="no model.safetensors"):
        CompactModel.from_pretrained(str(tmp_path))


def test_backend_torch_equals_cofi_ops_and_pad_ffn_exact():
    c = _compact("roberta", "cls")
    inp = example_inputs(c, batch=3, seq=12)
    with torch.no_grad():
        a = c(*inp).logits
        b = c.set_backend("torch")(*inp).logits
        c.set_backend("auto")
        n = c.num_encoder_params()
        c.pad_ffn_(8)
        p = c(*inp).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, p, atol=1e-5, rtol=1e-5)
    assert all(w % 8 == 0 for w in c.config.intermediate_sizes)
    assert c.num_encoder_params() == n  # zero padding units are not counted


@pytest.mark.parametrize("arch,task,multiple", [("bert", "cls", 16), ("roberta", "qa", 64), ("bert", "qa", 7)])
def test_pad_hidden_exact_and_not_counted(tmp_path, arch, task, multiple):
    c = _compact(arch, task, torch.float64, seed=3)
    assert c.num_encoder_params() == sum(p.numel() for p in c.layers.parameters())
    n, d, idx = c.num_encoder_params(), c.config.hidden_size, list(c.config.hidden_index)
    inp = example_inputs(c, batch=3, seq=11)
    with torch.no_grad():
        want = c(*inp, output_hidden_states=True)
        c.pad_(multiple)
        got = c(*inp, output_hidden_states=True)
    cfg = c.config
    assert cfg.hidden_size % multiple == 0 and cfg.hidden_size - cfg.zero_hidden_dims == d
    assert cfg.zero_hidden_dims == -d % multiple and cfg.hidden_index == idx
    assert all(w % multiple == 0 for w, p in zip(cfg.intermediate_sizes, cfg.ffn_present) if p and w)
    assert c.num_encoder_params() == n and c.sparsity() == pytest.approx(1 - n / cfg.full_encoder_params())
    for a, b in zip(_outs(want), _outs(got)):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
    assert all(h.shape[-1] == d for h in got.hidden_states)
    for a, b in zip(want.hidden_states, got.hidden_states):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
    c.save_pretrained(str(tmp_path / "p"))
    loaded = CompactModel.from_pretrained(str(tmp_path / "p"))
    assert loaded.config == cfg
    with torch.no_grad():
        for a, b in zip(_outs(want), _outs(loaded.set_backend("torch")(*inp))):
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_pad_bad_multiple():
    with pytest.raises(ValueError, match="pad_hidden_ multiple must be an int >= 1, got 0"):
        _compact().pad_hidden_(0)
    with pytest.raises(ValueError, match="pad_ffn_ multiple must be an int >= 1, got 0"):
        _compact().pad_ffn_(0)
    with pytest.raises(ValueError, match="pad_hidden_ multiple must be an int >= 1, got -8"):
        _compact().pad_(-8)


@pytest.mark.parametrize("task", ["cls", "qa"])
def test_predict_dynamic_padding_matches_single_examples(task):
    c = _compact("bert", task)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 3, 9, 9, 12, 1, 20]
    feats = [{"input_ids": torch.randint(5, 97, (n,), generator=g).tolist(), "token_type_ids": [0] * n}
             for n in lengths]
    res = predict(c, feats, batch_size=3)
    with torch.no_grad():
        for i, f in enumerate(feats):
            ids = torch.tensor([f["input_ids"]])
            o = c(ids, torch.ones_like(ids))
            if task == "cls":
                torch.testing.assert_close(res["logits"][i], o.logits[0], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(res["start_logits"][i], o.start_logits[0], atol=1e-5, rtol=1e-5)
                assert res["end_logits"][i].shape == (lengths[i],)


def test_torch_compile_fullgraph():
    c = _compact("bert", "cls")
    inp = example_inputs(c, batch=2, seq=12)
    cc = torch.compile(c, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(cc(*inp).logits, c(*inp).logits, atol=1e-6, rtol=1e-6)


def test_torch_export_dynamic_shapes():
    c = _compact("roberta", "qa")
    prog = export_program(c)  # checks two shapes against eager internally
    inp = example_inputs(c, batch=4, seq=7)
    with torch.no_grad():
        s, e = prog.module()(*inp)
        torch.testing.assert_close(s, c(*inp).start_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pad", [None, 16])
def test_onnx_export_checked_with_onnxruntime(tmp_path, pad):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    c = _compact("bert", "cls")
    inp = example_inputs(c, batch=5, seq=13)
    with torch.no_grad():
        want = c(*inp).logits
    if pad:  # padded dims are left out of LayerNorm statistics in the exported graph too
        c.pad_(pad)
    path = export_onnx(c, str(tmp_path / "model.onnx"))  # raises if onnxruntime disagrees
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(["input_ids", "attention_mask", "token_type_ids"], inp)})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_cli_export_torch_export(tmp_path):
    import argparse

    from cofi.runtime import cli_export

    c = _compact("bert", "cls")
    c.save_pretrained(str(tmp_path))
    p = argparse.ArgumentParser()
    cli_export.add_arguments(p)
    assert cli_export.run(p.parse_args([str(tmp_path), "--format", "torch_export"])) == 0
    prog = torch.export.load(str(tmp_path / "model.pt2"))
    inp = example_inputs(c, batch=2, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(prog.module()(*inp)[0], c(*inp).logits, atol=1e-5, rtol=1e-5)
