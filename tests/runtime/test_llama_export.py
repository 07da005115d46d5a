"""Pruned decoders exported for plain transformers: a uniform fold is a stock LlamaForCausalLM folder
(no cofi, no remote code), a ragged one cofi's compact format with its own modeling file
(trust_remote_code=True); both load in a process where cofi cannot be imported and give the masked
model's logits (float32 tight, float64 1e-8 with the stock RMSNorm computed in float64)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from cofi.errors import UserError
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.compact_llama import CompactLlamaForCausalLM
from cofi.runtime.llama_export import export_llama, is_stock

sys.path.insert(0, os.path.dirname(__file__))
from cofi_free import run_without_cofi
from llama_tiny import V, pair, ragged_masks, uniform_masks

CHILD = """
    import json, sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    def rms64(self, h):  # stock RMSNorm rounds through float32; float64 folders compare in float64
        if h.dtype != torch.float64:
            return orig(self, h)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    orig = modeling_llama.LlamaRMSNorm.forward
    modeling_llama.LlamaRMSNorm.forward = rms64
    out = {}
    for name, d in json.loads(sys.argv[1]).items():
        t = load_file(d + "/expected.safetensors")
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        with torch.no_grad():
            got = m(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        keep = t["attention_mask"].bool()
        err = float((got - t["logits"])[keep].abs().max() / t["logits"][keep].abs().max())
        out[name] = {"class": type(m).__name__, "dtype": str(next(m.parameters()).dtype), "rel": err,
                     "cofi_loaded": any(k.startswith("cofi") for k in sys.modules if sys.modules[k] is not None)}
    print(json.dumps(out))
"""


def dropped_masks(s):
    """Uniform, with layer 1's attention and MLP gates both 0: a stock model of the other layers."""
    m = uniform_masks(s)
    m.mha[1], m.ffn[1] = 0.0, 0.0
    return m


def _export(tmp_path, name: str, dtype: torch.dtype, masks_fn, kind: str = "llama", tie: bool = True, **kw) -> str:
    from safetensors.torch import save_file

    _, m = pair(kind, dtype=dtype, tie_word_embeddings=tie)
    masks = masks_fn(m.shape)
    ids = torch.randint(3, V, (3, 10), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 10, dtype=torch.int64)
    am[1, 7:] = 0  # right padding: positions 0..S-1 in every implementation
    with torch.no_grad():
        want = m(ids, attention_mask=am, masks=masks).logits
    d = export_llama(fold_llama(m, masks), tmp_path / name, **kw)
    save_file({"input_ids": ids, "attention_mask": am, "logits": want.contiguous()}, str(d / "expected.safetensors"))
    return str(d)


def test_exported_folders_load_in_plain_transformers_without_cofi(tmp_path):
    folders = {"stock32": _export(tmp_path, "stock32", torch.float32, uniform_masks),
               "stock64": _export(tmp_path, "stock64", torch.float64, uniform_masks, tie=False),
               "ragged32": _export(tmp_path, "ragged32", torch.float32, ragged_masks),
               "ragged64_qwen2": _export(tmp_path, "ragged64", torch.float64, ragged_masks, kind="qwen2", tie=False),
               "dropped64": _export(tmp_path, "dropped64", torch.float64, dropped_masks, tie=False)}
    res = run_without_cofi(CHILD, folders, tmp_path)
    print(json.dumps(res, indent=1))
    assert set(res) == set(folders)
    assert not any(v["cofi_loaded"] for v in res.values())
    assert res["stock32"]["class"] == res["stock64"]["class"] == res["dropped64"]["class"] == "LlamaForCausalLM"
    assert res["ragged32"]["class"] == res["ragged64_qwen2"]["class"] == "CofiLlamaCompactForCausalLM"
    assert res["stock64"]["dtype"] == res["ragged64_qwen2"]["dtype"] == "torch.float64"
    for name in ("stock32", "ragged32"):
        assert res[name]["rel"] <= 1e-5, (name, res[name])
    for name in ("stock64", "ragged64_qwen2", "dropped64"):
        assert res[name]["rel"] <= 1e-8, (name, res[name])
    stock = json.loads((tmp_path / "stock32" / "config.json").read_text())
    assert stock["model_type"] == "llama" and "auto_map" not in stock
    assert not (tmp_path / "stock32" / "modeling_cofi_llama.py").exists()
    dropped = json.loads((tmp_path / "dropped64" / "config.json").read_text())
    assert dropped["num_hidden_layers"] == 2 and "auto_map" not in dropped
    assert "layers [1] keep neither sublayer" in (tmp_path / "dropped64" / "README.md").read_text()
    assert (tmp_path / "ragged32" / "modeling_cofi_llama.py").is_file()


def test_folder_contents_card_tokenizer_and_cofi_reload(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "max_new_tokens": 7}))
    _, m = pair("llama", dtype=torch.float32)
    compact = fold_llama(m, uniform_masks(m.shape))
    assert is_stock(compact)
    d = export_llama(compact, tmp_path / "out", source=src, base_model="tiny-llama")
    names = sorted(p.name for p in d.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert json.loads((d / "generation_config.json").read_text())["max_new_tokens"] == 7
    card = (d / "README.md").read_text()
    n = compact.config.num_parameters()
    assert "tiny-llama" in card and f"total {n['total']:,}" in card and "trust_remote_code" not in card

    ragged = fold_llama(m, ragged_masks(m.shape))
    r = export_llama(ragged, tmp_path / "ragged")
    assert "trust_remote_code=True" in (r / "README.md").read_text()
    assert json.loads((r / "generation_config.json").read_text())["eos_token_id"] == 2
    back = CompactLlamaForCausalLM.from_pretrained(r)  # still a cofi compact folder
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(ids), ragged(ids))


def test_refusals(tmp_path):
    _, m = pair("llama", dtype=torch.float32)
    ragged = fold_llama(m, ragged_masks(m.shape))
    with pytest.raises(UserError, match="stock export needs"):
        export_llama(ragged, tmp_path / "a", mode="stock")
    with pytest.raises(UserError, match="mode must be"):
        export_llama(ragged, tmp_path / "b", mode="onnx")
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="must not exist"):
        export_llama(ragged, tmp_path / "c")
    with pytest.raises(UserError, match="source must be"):
        export_llama(ragged, tmp_path / "d", source=tmp_path / "missing")


def test_dropped_layers_renumber_and_one_sublayer_is_refused():
    import transformers as T

    hf, m = pair("qwen2", dtype=torch.float64)  # per-layer layer_types follow the kept layers
    compact = fold_llama(m, dropped_masks(m.shape))
    cfg = compact.config.stock_config()
    assert compact.config.stock_layers() == [0, 2] and cfg.num_hidden_layers == 2 and len(cfg.layer_types) == 2
    stock = T.Qwen2ForCausalLM(cfg).double().eval()
    missing, unexpected = stock.load_state_dict(compact.stock_state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m(ids, masks=dropped_masks(m.shape)).logits
        assert float((stock(ids).logits - want).abs().max() / want.abs().max()) <= 1e-6  # RMSNorm via float32

    for gate, kept in (("mha", "MLP"), ("ffn", "attention")):
        masks = uniform_masks(m.shape)
        getattr(masks, gate)[2] = 0.0
        one = fold_llama(m, masks)
        assert not is_stock(one)
        with pytest.raises(UserError, match=f"both sublayers or neither in every layer; layer 2 keeps only its {kept}$"):
            one.config.stock_config()
