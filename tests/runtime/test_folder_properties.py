"""Property tests of compact model folders: random structures round-trip through
save_pretrained / from_pretrained with equal outputs, and a damaged config.json or model.safetensors
either loads as the very same model or is refused with one UserError; never a silently other model."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cofi.errors import UserError
from cofi.runtime import CompactConfig, CompactModel

SETTINGS = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw) -> CompactConfig:
    """A random, valid compact structure (tiny sizes)."""
    arch = draw(st.sampled_from(["bert", "roberta"]))
    task = draw(st.sampled_from(["sequence_classification", "question_answering"]))
    layers = draw(st.integers(1, 3))
    heads, head_dim, ffn, d_orig = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6)), 8
    kept = sorted(draw(st.sets(st.integers(0, d_orig - 1), min_size=1, max_size=d_orig)))
    kept_heads = [sorted(draw(st.sets(st.integers(0, heads - 1), max_size=heads))) for _ in range(layers)]
    pad = 1 if arch == "roberta" else 0
    return CompactConfig(
        model_type=arch, task=task, vocab_size=draw(st.integers(8, 20)), max_position_embeddings=16,
        type_vocab_size=draw(st.integers(1, 2)), pad_token_id=pad, hidden_size=len(kept), original_hidden_size=d_orig,
        hidden_index=kept, head_dim=head_dim, num_heads=[len(h) for h in kept_heads],
        attention_present=[draw(st.booleans()) for _ in range(layers)],
        intermediate_sizes=[draw(st.integers(0, ffn)) for _ in range(layers)],
        ffn_present=[draw(st.booleans()) for _ in range(layers)], original_num_heads=heads,
        original_intermediate_size=ffn, hidden_act=draw(st.sampled_from(["gelu", "relu", "gelu_new"])),
        num_labels=2 if task == "question_answering" else draw(st.integers(1, 3)),
        classifier_size=draw(st.integers(1, 6)), distill_proj_size=draw(st.one_of(st.none(), st.integers(1, 5))),
        kept_heads=kept_heads)


def random_model(cfg: CompactConfig, seed: int) -> CompactModel:
    m = CompactModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def outputs(m: CompactModel, cfg: CompactConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (2, 7), generator=g)
    am = torch.ones_like(ids)
    am[1, 4:] = 0
    ids[1, 4:] = cfg.pad_token_id
    with torch.no_grad():
        o = m(ids, attention_mask=am, token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
    return [t for t in (o.logits, o.start_logits, o.end_logits, *o.hidden_states) if t is not None]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@SETTINGS
@given(cfg=configs(), seed=st.integers(0, 2 ** 16))
def test_round_trip_same_outputs(cfg, seed):
    m = random_model(cfg, seed)
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        loaded = CompactModel.from_pretrained(tmp)
    assert loaded.config == m.config
    assert same(outputs(m, cfg), outputs(loaded, cfg))


JUNK = ["abc", None, True, [], {}, -3, 0, 2.5, 10 ** 9, [1], {"a": 1}]


@SETTINGS
@given(cfg=configs(), key=st.sampled_from(sorted(CompactConfig.__dataclass_fields__) + ["architecture"]),
       junk=st.sampled_from(JUNK + ["<delete>"]))
def test_damaged_config_is_refused_or_harmless(cfg, key, junk):
    # valid values of another model no check can tell from the right one: a finite positive eps,
    # another RoBERTa padding index (positions count from it); everything else must be caught
    assume(not (key == "layer_norm_eps" and junk in (2.5, 10 ** 9)))
    assume(not (key == "pad_token_id" and junk == 0 and cfg.model_type == "roberta"))
    m = random_model(cfg, 0)
    want = outputs(m, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        path = Path(tmp) / "config.json"
        d = json.loads(path.read_text())
        if junk == "<delete>":
            d.pop(key, None)
        else:
            d[key] = junk
        path.write_text(json.dumps(d))
        try:
            loaded = CompactModel.from_pretrained(tmp)
        except UserError as e:
            assert "\n" not in str(e)
            return
    assert same(outputs(loaded, cfg), want), (key, junk)


@SETTINGS
@given(cfg=configs(), flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                      min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_damaged_weights_are_refused_or_harmless(cfg, flips, cut):
    m = random_model(cfg, 0)
    want = outputs(m, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        m.save_pretrained(tmp)
        path = Path(tmp) / "model.safetensors"
        b = bytearray(path.read_bytes())
        for where, x in flips:
            b[int(where * len(b))] ^= x
        if cut is not None:
            b = b[: int(cut * len(b))]
        path.write_bytes(bytes(b))
        try:
            loaded = CompactModel.from_pretrained(tmp)
        except UserError as e:
            assert "\n" not in str(e)
            return
    assert same(outputs(loaded, cfg), want)


def test_nan_weights_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = CompactConfig(model_type="bert", task="sequence_classification", vocab_size=10, max_position_embeddings=8,
                        type_vocab_size=1, pad_token_id=0, hidden_size=4, original_hidden_size=4,
                        hidden_index=[0, 1, 2, 3], head_dim=2, num_heads=[2], attention_present=[True],
                        intermediate_sizes=[3], ffn_present=[True], original_num_heads=2, original_intermediate_size=3)
    random_model(cfg, 0).save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["layers.0.ffn.w1"][1, 2] = float("nan")
    save_file(sd, str(tmp_path / "model.safetensors"))  # re-saved without cofi's checksum
    with pytest.raises(UserError, match=r"tensor 'layers.0.ffn.w1' has 1 NaN/inf value"):
        CompactModel.from_pretrained(str(tmp_path))
