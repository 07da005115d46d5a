"""Decoder runtime (cofi.runtime.llama_runtime / generate): prefill + incremental decoding equals the
full-sequence compact forward and the masked model (float64), padded batches equal each row alone,
the KV cache is never reallocated, greedy tokens equal transformers' generate on the exported stock
checkpoint, sampling follows transformers' top-k / top-p and is reproducible with a seed, and
``cofi generate`` streams tokens and refuses mistakes in one line."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from cofi.cli import main
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.generate import SamplingConfig, generate, left_pad, next_tokens
from cofi.runtime.llama_export import export_llama
from cofi.runtime.llama_runtime import LlamaRuntime

sys.path.insert(0, os.path.dirname(__file__))
from llama_tiny import V, pair, ragged_masks, uniform_masks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind,tie", [("llama", True), ("qwen2", False), ("llama_bias", False)])
def test_prefill_and_decode_equal_full_forward_and_masked(kind, tie):
    _, m = pair(kind, tie_word_embeddings=tie)
    masks = ragged_masks(m.shape)
    compact = fold_llama(m, masks)
    assert compact.config.q_to_kv[0] == [0, 1, 1, 1]  # ragged heads per group: padded to uniform GQA
    rt = LlamaRuntime(compact)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = m(ids, masks=masks).logits
        assert _rel(compact(ids), want) <= 1e-10
        assert _rel(rt(ids), want) <= 1e-10
        cache = rt.new_cache(2, 12)
        ptrs = [t.data_ptr() for t in cache.k + cache.v if t is not None]
        steps = [rt(ids[:, :5], None, cache)] + [rt(ids[:, t:t + 1], None, cache) for t in range(5, 12)]
        assert [t.data_ptr() for t in cache.k + cache.v if t is not None] == ptrs  # written in place
        assert cache.k[-1] is None  # the last layer has no attention: no cache
        assert _rel(torch.cat(steps, 1), want) <= 1e-10


def test_padded_batch_equals_each_row_alone():
    _, m = pair("llama")
    rt = LlamaRuntime(fold_llama(m, ragged_masks(m.shape)))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 3, 6)]
    ids, am = left_pad(prompts, 0)
    nxt = torch.randint(0, V, (3, 4), generator=g)
    with torch.inference_mode():
        cache = rt.new_cache(3, 13)
        got = [rt(ids, am, cache, last_only=True)] + [rt(nxt[:, t:t + 1], None, cache) for t in range(4)]
        got = torch.cat(got, 1)
        for i, p in enumerate(prompts):
            alone = rt(torch.tensor([p + nxt[i].tolist()]))[0, len(p) - 1:]
            assert _rel(got[i], alone) <= 1e-10


def test_greedy_equals_transformers_generate_on_stock_export(tmp_path):
    import transformers as T

    _, m = pair("llama", dtype=torch.float32)
    compact = fold_llama(m, uniform_masks(m.shape))
    folder = export_llama(compact, tmp_path / "stock")
    hf = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 4, 10)]
    ids, am = left_pad(prompts, 0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, ids.shape[1]:]
    got = generate(LlamaRuntime(compact), prompts, SamplingConfig(max_new_tokens=12))
    assert got == ref.tolist()
    dense_hf, dense = pair("llama", dtype=torch.float32, seed=5)
    with torch.no_grad():
        ref = dense_hf.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                eos_token_id=None)[:, ids.shape[1]:]
    assert generate(LlamaRuntime(fold_llama(dense, None)), prompts, SamplingConfig(max_new_tokens=8)) == ref.tolist()


def test_sampling_filters_match_transformers_and_seed_reproduces():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8)
    want = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    draws = torch.stack([next_tokens(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)])
    allowed = torch.isfinite(want)
    assert bool(allowed.gather(1, draws.T).all()) and int(allowed.sum(1).min()) >= 1
    assert len(set(draws[:, 0].tolist())) > 1

    _, m = pair("llama", dtype=torch.float32)
    rt = LlamaRuntime(fold_llama(m, ragged_masks(m.shape)))
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a, b = generate(rt, prompts, s), generate(rt, prompts, s)
    assert a == b and generate(rt, prompts, SamplingConfig(**{**s.__dict__, "seed": 8})) != a
    assert generate(rt, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=1, seed=1)) == \
        generate(rt, prompts, SamplingConfig(max_new_tokens=6))
    greedy = generate(rt, prompts, SamplingConfig(max_new_tokens=6))
    stop = greedy[0][2]
    cut = generate(rt, prompts, SamplingConfig(max_new_tokens=6, stop_tokens=(stop,)))
    assert cut[0] == greedy[0][: greedy[0].index(stop) + 1]


def test_cli_generate_streams_and_refuses(tmp_path, capsys):
    _, m = pair("llama", dtype=torch.float32)
    compact = fold_llama(m, uniform_masks(m.shape))
    folder = export_llama(compact, tmp_path / "stock")
    want = generate(LlamaRuntime(compact), [[5, 6, 7]], SamplingConfig(max_new_tokens=5, stop_tokens=(2,)))[0]
    assert main(["generate", str(folder), "--prompt-ids", "5,6,7", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want]
    compact.save_pretrained(tmp_path / "compact")
    assert main(["generate", str(tmp_path / "compact"), "--prompt-ids", "5,6,7", "--prompt-ids", "9",
                 "--max-new-tokens", "3", "--temperature", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("[0] ")
    for argv, msg in ((["--prompt", "hi"], "needs a tokenizer"), (["--prompt-ids", "1,x"], "comma-separated"),
                      (["--prompt-ids", str(V + 5)], "must be in"), (["--prompt-ids", "1", "--top-p", "0"], "top_p")):
        assert main(["generate", str(folder), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1
    assert main(["generate", str(tmp_path / "nothing"), "--prompt-ids", "1"]) == 2
    assert "cofi_llama.json" in capsys.readouterr().err
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 2
