"""A compact model folder loads with plain transformers (``trust_remote_code=True``) in a process
where cofi cannot be imported, and gives CompactModel's logits (fp32); the folder still loads in
cofi, carries a model card, and the modeling file refuses nothing cofi accepts (padding, RoBERTa, QA)."""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
sys.path.insert(0, os.path.dirname(__file__))
from cofi_free import run_without_cofi  # noqa: E402
from masked_forward_ref import random_masks, tiny_hf_model  # noqa: E402

from cofi.pruning import prune  # noqa: E402
from cofi.runtime import CompactModel  # noqa: E402
from cofi.runtime.export import example_inputs  # noqa: E402

# runs where cofi cannot be imported (cofi_free.run_without_cofi); reads inputs and cofi's logits from safetensors, writes the max errors
CHILD = """
    import json, sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    folders, out = json.loads(sys.argv[1]), {}
    for name, d in folders.items():
        t = load_file(d + "/expected.safetensors")
        auto = AutoModelForQuestionAnswering if "start" in t else AutoModelForSequenceClassification
        m = auto.from_pretrained(d, trust_remote_code=True).eval()
        with torch.no_grad():
            o = m(input_ids=t["input_ids"], attention_mask=t["attention_mask"], token_type_ids=t["token_type_ids"])
        got = {"logits": o.logits} if "logits" in t else {"start": o.start_logits, "end": o.end_logits}
        out[name] = {"class": type(m).__name__, "dtype": str(next(m.parameters()).dtype),
                     "err": max(float((got[k] - t[k]).abs().max()) for k in got),
                     "cofi_loaded": any(k.startswith("cofi") for k in sys.modules if sys.modules[k] is not None)}
    print(json.dumps(out))
"""


def _save_with_expected(c: CompactModel, d) -> str:
    from safetensors.torch import save_file

    c.save_pretrained(str(d))
    ids, am, tt = example_inputs(c, batch=3, seq=11)
    with torch.no_grad():
        o = c(ids, am, tt)
    want = {"logits": o.logits} if o.logits is not None else {"start": o.start_logits, "end": o.end_logits}
    save_file({"input_ids": ids, "attention_mask": am, "token_type_ids": tt, **want}, str(d / "expected.safetensors"))
    return str(d)


def test_plain_transformers_loads_compact_folders_without_cofi(tmp_path):
    folders = {}
    m = tiny_hf_model("bert", "cls", torch.float32, num_labels=3)
    bert = prune(m, random_masks(m.config, True, 1))
    folders["bert"] = _save_with_expected(bert, tmp_path / "bert")
    padded = CompactModel.from_pretrained(folders["bert"], pad=16)  # zero hidden dims and FFN units
    assert padded.config.zero_hidden_dims > 0
    folders["bert_padded"] = _save_with_expected(padded, tmp_path / "bert_padded")
    rob = tiny_hf_model("roberta", "cls", torch.float32, num_labels=2)
    folders["roberta"] = _save_with_expected(prune(rob, random_masks(rob.config, False, 2)), tmp_path / "roberta")
    qa = tiny_hf_model("roberta", "qa", torch.float32, num_labels=2)
    folders["qa"] = _save_with_expected(prune(qa, random_masks(qa.config, True, 3)), tmp_path / "qa")

    res = run_without_cofi(CHILD, folders, tmp_path)
    assert set(res) == set(folders)
    for name, v in res.items():
        assert not v["cofi_loaded"], name
        assert v["dtype"] == "torch.float32", (name, v)
        assert v["err"] <= 1e-5, (name, v)
    assert res["qa"]["class"] == "CofiCompactForQuestionAnswering"
    assert res["bert"]["class"] == "CofiCompactForSequenceClassification"


def test_folder_is_a_transformers_folder_and_still_a_cofi_folder(tmp_path):
    m = tiny_hf_model("bert", "cls", torch.float32, num_labels=3)
    c = prune(m, random_masks(m.config, True, 1))
    c.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "cofi_compact" and cfg["base_model_type"] == "bert"
    assert cfg["auto_map"]["AutoModelForSequenceClassification"] == \
        "modeling_cofi_compact.CofiCompactForSequenceClassification"
    assert (tmp_path / "modeling_cofi_compact.py").is_file()
    card = (tmp_path / "README.md").read_text()
    assert f"{c.num_encoder_params():,}" in card and f"sparsity {c.sparsity():.4f}" in card
    loaded = CompactModel.from_pretrained(str(tmp_path))
    assert loaded.config == c.config
    # a README the user wrote is never replaced
    (tmp_path / "README.md").write_text("my card\n")
    c.save_pretrained(str(tmp_path))
    assert (tmp_path / "README.md").read_text() == "my card\n"
