"""Masked Llama-family causal LM (cofi.models.llama): equals transformers with every mask 1, folds to
a compact decoder equal to the masked one, counts its parameters as the formulas say, GQA rule.

transformers' RMSNorm computes in float32 whatever the input dtype (it casts up for half precision,
which rounds a float64 input down); the float64 comparisons replace its forward by the same formula
in the input's dtype (``exact_hf_rms_norm``), and also check the stock model within float32 rounding.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from cofi.errors import UserError
from cofi.masks.decoder import DecoderMasks, DecoderShape, expected_size, full_size, kept_structure, real_size
from cofi.models.llama import CoFiLlamaForCausalLM
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.compact_llama import CompactLlamaForCausalLM

V = 101
TINY = {"vocab_size": V, "hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _config(kind: str, **kw):
    c = {**TINY, **kw}
    if kind == "qwen2":
        return T.Qwen2Config(**c)
    if kind == "mistral":
        return T.MistralConfig(sliding_window=None, **c)
    if kind == "llama3":
        return T.LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32}, **c)
    return T.LlamaConfig(attention_bias=kind == "llama_bias", mlp_bias=kind == "llama_bias", **c)


def _pair(kind: str, seed: int = 0, **kw):
    """transformers' model (float64, weights perturbed off their init) and cofi's with its weights."""
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(_config(kind, **kw)).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = CoFiLlamaForCausalLM(hf.config).double().eval()
    m.load_hf_state_dict(hf.state_dict())
    return hf, m


@pytest.fixture
def exact_hf_rms_norm(monkeypatch):
    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for mod in ("llama", "qwen2", "mistral"):
        cls = getattr(__import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"]),
                      {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[mod] + "RMSNorm")
        monkeypatch.setattr(cls, "forward", forward)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _random_masks(s: DecoderShape, seed: int, soft: bool) -> DecoderMasks:
    g = torch.Generator().manual_seed(seed)

    def draw(shape, p):
        k = (torch.rand(shape, generator=g) < p).double()
        return k * (0.4 + 0.8 * torch.rand(shape, generator=g)) if soft else k

    L = s.num_layers
    mha, ffn = torch.ones(L, dtype=torch.float64), torch.ones(L, dtype=torch.float64)
    mha[L - 1], ffn[0] = 0.0, 0.0  # a removed sublayer of each kind
    if soft:
        mha[0], ffn[1] = 0.7, 1.3
    return DecoderMasks(hidden=draw(s.shape("hidden"), 0.7), head=draw(s.shape("head"), 0.6),
                        kv=draw(s.shape("kv"), 0.8), mha=mha, intermediate=draw(s.shape("intermediate"), 0.5),
                        ffn=ffn)


# ---------------------------------------------------------------------------- equals transformers
@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("qwen2", False), ("llama_bias", False),
                                      ("llama3", True), ("mistral", False)])
def test_all_ones_equals_transformers(kind, tie, exact_hf_rms_norm):
    hf, m = _pair(kind, tie_word_embeddings=tie)
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        ref = hf(ids).logits
        for backend in ("compact", "dense"):
            assert _rel(m(ids, backend=backend).logits, ref) <= 1e-8, backend
            assert _rel(m(ids, masks=DecoderMasks.ones(m.shape, torch.float64), backend=backend).logits, ref) <= 1e-8


def test_stock_transformers_within_float32_rounding():
    hf, m = _pair("llama")
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert _rel(m(ids).logits, hf(ids).logits) <= 1e-6


def test_right_padding_equals_transformers(exact_hf_rms_norm):
    hf, m = _pair("qwen2")
    ids = torch.randint(0, V, (2, 10))
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0
    with torch.no_grad():
        a, b = m(ids, attention_mask=am).logits, hf(ids, attention_mask=am).logits
    keep = am.bool()
    assert _rel(a[keep], b[keep]) <= 1e-8
    with torch.no_grad():
        a = m(ids, attention_mask=am, backend="dense").logits
    assert _rel(a[keep], b[keep]) <= 1e-8


def test_from_pretrained_folder(tmp_path, exact_hf_rms_norm):
    hf, _ = _pair("llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "ckpt")
    m = CoFiLlamaForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float64).eval()
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        assert _rel(m(ids).logits, hf(ids).logits) <= 1e-8
    assert m.lm_head.weight is m.model.embed_tokens.weight


# ---------------------------------------------------------------------------- fold
@pytest.mark.parametrize("kind,tie", [("llama", True), ("qwen2", False), ("llama_bias", False)])
@pytest.mark.parametrize("soft", [False, True])
def test_folded_equals_masked(kind, tie, soft):
    _, m = _pair(kind, seed=1, tie_word_embeddings=tie)
    masks = _random_masks(m.shape, seed=3, soft=soft)
    ids = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        want = m(ids, masks=masks).logits
        compact = fold_llama(m, masks)
        got = compact(ids)
    assert _rel(got, want) <= 1e-10
    c = compact.config
    assert len({len(h) for h in c.q_heads}) > 1 or len(set(c.intermediate_sizes)) > 1  # ragged per layer
    assert c.hidden_size < m.shape.hidden_size and c.tie_word_embeddings == tie
    counted = sum(p.numel() for p in compact.parameters())
    sizes = real_size(masks, m.shape)
    assert counted == sizes["total"] == c.num_parameters()["total"]
    assert sizes["lm_head"] == (0 if tie else V * c.hidden_size)
    exp = expected_size(masks.binarize(), m.shape)
    assert all(float(exp[k]) == sizes[k] for k in sizes)


def test_folded_model_saves_and_loads(tmp_path):
    _, m = _pair("llama", seed=2)
    masks = _random_masks(m.shape, seed=5, soft=True)
    compact = fold_llama(m, masks)
    compact.save_pretrained(tmp_path / "c")
    back = CompactLlamaForCausalLM.from_pretrained(tmp_path / "c")
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), compact(ids))
    with pytest.raises(UserError, match="must not exist"):
        compact.save_pretrained(tmp_path / "c")


def test_full_size_smollm2_formula():
    cfg = T.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    assert full_size(DecoderShape.from_hf_config(cfg)) == {"body": 106_203_456, "embedding": 28_311_552,
                                                            "lm_head": 0, "total": 134_515_008}


# ---------------------------------------------------------------------------- GQA rule
def _ones(s: DecoderShape) -> DecoderMasks:
    return DecoderMasks.ones(s, torch.float64)


def test_kv_group_zero_kills_its_query_heads():
    _, m = _pair("llama", seed=4)
    s = m.shape  # H = 6, G = 2: group 0 = heads 0-2, group 1 = heads 3-5
    a, b = _ones(s), _ones(s)
    a.kv[1, 0] = 0.0
    b.head[1, :3] = 0.0
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(ids, masks=a).logits, m(ids, masks=b).logits)
    for mk in (a, b):
        _, kept = kept_structure(mk, s)
        assert kept[1].q_heads == [3, 4, 5] and kept[1].kv_heads == [1] and kept[1].q_to_kv == [0, 0, 0]
        assert fold_llama(m, mk).config.kv_heads[1] == [1]


def test_ragged_heads_per_group_fold_and_stock_export():
    _, m = _pair("llama", seed=6)
    s = m.shape
    ragged = _ones(s)
    ragged.head[0, [0, 1]] = 0.0  # layer 0: group 0 keeps 1 query head, group 1 keeps 3
    _, kept = kept_structure(ragged, s)
    assert kept[0].q_to_kv == [0, 1, 1, 1]
    ids = torch.randint(0, V, (2, 9))
    compact = fold_llama(m, ragged)
    with torch.no_grad():
        assert _rel(compact(ids), m(ids, masks=ragged).logits) <= 1e-10
    with pytest.raises(UserError, match="query heads per K/V group|equal nonzero counts"):
        compact.config.stock_config()

    uniform = _ones(s)
    uniform.head[:, [1, 4]] = 0.0  # every layer: 2 heads in each group
    uniform.intermediate[:, 5:15] = 0.0
    uniform.hidden[::4] = 0.0
    compact = fold_llama(m, uniform)
    stock = T.LlamaForCausalLM(compact.config.stock_config()).double().eval()
    missing, unexpected = stock.load_state_dict(compact.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and compact.config.stock_config().num_attention_heads == 4
    with torch.no_grad():
        assert _rel(stock(ids).logits, compact(ids)) <= 1e-6  # stock RMSNorm rounds through float32


def test_masks_carry_gradients():
    _, m = _pair("llama", seed=7)
    masks = _random_masks(m.shape, seed=8, soft=True).map(lambda t: t.clone().requires_grad_(True))
    m(torch.randint(0, V, (1, 6)), masks=masks).logits.square().sum().backward()
    for g, t in masks.items():
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, g


# ---------------------------------------------------------------------------- refused inputs
def test_refused_with_one_line(tmp_path):
    with pytest.raises(UserError, match="hidden_act must be 'silu'"):
        CoFiLlamaForCausalLM(_config("llama", hidden_act="gelu"))
    with pytest.raises(UserError, match="model_type must be one of"):
        DecoderShape.from_hf_config(T.BertConfig())
    m = CoFiLlamaForCausalLM(T.MistralConfig(sliding_window=8, **TINY))
    with pytest.raises(UserError, match="input length must be <= sliding_window 8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    m(torch.zeros(1, 8, dtype=torch.long))
    bad = DecoderMasks(head=torch.ones(3, 5))
    with pytest.raises(UserError, match=r"masks.head must have shape \(3, 6\), got \(3, 5\)"):
        m(torch.zeros(1, 4, dtype=torch.long), masks=bad)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(_config("llama").to_dict()))
    with pytest.raises(UserError, match="no pickled .bin"):
        CoFiLlamaForCausalLM.from_pretrained(tmp_path / "bin")


# ---------------------------------------------------------------------------- SmolLM2 (if set up)
SMOLLM2 = Path.home() / ".cache" / "cofi" / "smollm2-135m-instruct-q4_1"


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "model.safetensors").is_file(),
                    reason="SmolLM2 folder not set up (python tools/setup_smollm2.py)")
def test_smollm2_all_ones_equals_transformers(exact_hf_rms_norm):
    """Q4_1-dequantized weights (SmolLM2-135M-Instruct); the fold is checked on the tiny configs."""
    hf = T.LlamaForCausalLM.from_pretrained(str(SMOLLM2), dtype=torch.float64).eval()
    m = CoFiLlamaForCausalLM(hf.config, init_weights=False).double().eval()
    m.load_hf_state_dict(hf.state_dict())
    ids = torch.tensor([[1, 504, 3458, 282, 4274, 314]])
    with torch.no_grad():
        ref = hf(ids).logits
        assert _rel(m(ids, masks=DecoderMasks.ones(m.shape, torch.float64)).logits, ref) <= 1e-8
    assert sum(p.numel() for p in m.parameters()) == full_size(m.shape)["total"] == 134_515_008
