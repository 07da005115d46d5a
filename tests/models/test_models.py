"""cofi.models: equality with transformers (no masks / all-ones masks), loading and saving, and the
compact step == the dense-masked (reference) step in float64 for masks with exact zeros everywhere."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import BertConfig, RobertaConfig

from cofi.masks import MaskConfig, Masks, MaskSet
from cofi.models import (ALWAYS_GATHER, CoFiBertForQuestionAnswering, CoFiBertForSequenceClassification,
                         CoFiRobertaForQuestionAnswering, CoFiRobertaForSequenceClassification, CompactPolicy,
                         model_class_for)
from cofi.training.losses import identity_projection, layer_distill_loss, prediction_distill_loss

CLASSES = [CoFiBertForSequenceClassification, CoFiBertForQuestionAnswering, CoFiRobertaForSequenceClassification,
           CoFiRobertaForQuestionAnswering]
L, d, H, F_ = 3, 24, 4, 40


def _config(cls, **kw):
    base = dict(vocab_size=64, hidden_size=d, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F_,
                max_position_embeddings=40, num_labels=2 if cls.task == "qa" else 3, **kw)
    if cls.base_name == "roberta":
        return RobertaConfig(**base, type_vocab_size=1)
    return BertConfig(**base)


def _batch(B=3, S=9, roberta=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 4:] = 0
    ids[am == 0] = 1 if roberta else 0
    tt = None if roberta else (torch.arange(S)[None, :] >= 5).long().expand(B, S).contiguous()
    return ids, am, tt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each class's HF twin with random weights, saved with save_pretrained in a temp dir."""
    out = {}
    for cls in CLASSES:
        torch.manual_seed(0)
        hf = getattr(transformers, cls.hf_class)(_config(cls)).eval()
        path = tmp_path_factory.mktemp(cls.hf_class)
        hf.save_pretrained(path)
        out[cls] = (hf, path)
    return out


def _logits(o):
    return o.logits if getattr(o, "logits", None) is not None else torch.stack([o.start_logits, o.end_logits])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
class TestEqualsTransformers:
    def test_no_masks_and_all_ones(self, cls, saved):
        hf, path = saved[cls]
        model = cls.from_pretrained(path).eval()
        assert sorted(model.state_dict()) == sorted(k for k in hf.state_dict() if not k.endswith("position_ids"))
        ids, am, tt = _batch(roberta=cls.base_name == "roberta")
        with torch.no_grad():
            want = _logits(hf(ids, attention_mask=am, token_type_ids=tt))
            ones = Masks.ones(model.mask_config())
            for masks in (None, ones):
                for mode in ("compact", "dense"):
                    got = _logits(model(ids, am, tt, masks=masks, backend=mode))
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            hs = model(ids, am, tt, output_hidden_states=True).hidden_states
            hf_hs = hf.base_model(ids, attention_mask=am, token_type_ids=tt, output_hidden_states=True).hidden_states
            assert len(hs) == L + 1
            for a, b in zip(hs, hf_hs):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    def test_save_roundtrip(self, cls, saved, tmp_path):
        hf, path = saved[cls]
        model = cls.from_pretrained(path).eval()
        model.save_pretrained(tmp_path)
        back = getattr(transformers, cls.hf_class).from_pretrained(tmp_path).eval()
        again = cls.from_pretrained(tmp_path).eval()
        ids, am, tt = _batch(roberta=cls.base_name == "roberta")
        with torch.no_grad():
            want = _logits(hf(ids, attention_mask=am, token_type_ids=tt))
            torch.testing.assert_close(_logits(back(ids, attention_mask=am, token_type_ids=tt)), want)
            torch.testing.assert_close(_logits(again(ids, am, tt)), want)


def test_model_class_for_and_errors(tmp_path):
    assert model_class_for("roberta", "qa") is CoFiRobertaForQuestionAnswering
    with pytest.raises(ValueError, match="model_type"):
        model_class_for("gpt2", "cls")
    m = CoFiBertForSequenceClassification(_config(CoFiBertForSequenceClassification))
    with pytest.raises(ValueError, match="backend"):
        m(torch.zeros(1, 3, dtype=torch.long), backend="fast")


# ------------------------------------------------------------------------------ compact == dense

def _maskset(model, seed):
    """log_alpha with exact zeros in every group once sampled: a dead FFN layer (layer 0), a dead MHA
    layer (layer 1), all heads of layer 2 dead (gate alive), most FFN units of layer 2 dead, a
    quarter of the hidden dims dead, and random values elsewhere."""
    torch.manual_seed(seed)
    ms = MaskSet(model.mask_config(), dtype=torch.float64)
    with torch.no_grad():
        ms.log_alpha.uniform_(-1.0, 3.0)
        ms.log_alpha_ffn[0] = -30
        ms.log_alpha_mha[1] = -30
        ms.log_alpha_mha[[0, 2]] = 30
        ms.log_alpha_ffn[[1, 2]] = 30
        ms.log_alpha_head[2] = -30
        ms.log_alpha_head[0, 1] = -30
        ms.log_alpha_intermediate[2, 5:] = -30
        ms.log_alpha_intermediate[1, ::3] = -30
        ms.log_alpha_hidden[::4] = -30
    return ms


def _step(model, ms, noise, batch, mode, policy, teacher_out, proj):
    model.zero_grad(set_to_none=True)
    ms.zero_grad(set_to_none=True)
    proj.zero_grad(set_to_none=True)
    z = ms.sample(noise=noise)
    ids, am, tt = batch
    out = model(ids, am, tt, masks=z, backend=mode, policy=policy, output_hidden_states=True)
    lg = _logits(out)
    loss = prediction_distill_loss(lg.reshape(-1, lg.shape[-1]), teacher_out[0].reshape(-1, lg.shape[-1]))
    ld, match = layer_distill_loss(out.hidden_states, teacher_out[1], proj, teacher_layers=(1, 2, 3),
                                   student_index=out.hidden_index)
    lag, _ = ms.lagrangian(0.3)
    total = loss + ld + lag + 0.01 * lg.pow(2).sum()
    total.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    grads.update({"proj." + n: p.grad.clone() for n, p in proj.named_parameters()})
    return total.detach(), grads, ms.log_alpha.grad.clone(), z, match, out


@pytest.mark.parametrize("cls", [CoFiBertForSequenceClassification, CoFiRobertaForQuestionAnswering],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("seed", [0, 1])
def test_compact_equals_dense_float64(cls, seed):
    torch.manual_seed(seed)
    model = cls(_config(cls, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).double().eval()
    teacher = cls(_config(cls)).double().eval()
    ms = _maskset(model, seed)
    with torch.no_grad():
        ms.lambda_1.fill_(0.7)
        ms.lambda_2.fill_(0.2)
    proj = identity_projection(d, dtype=torch.float64)
    with torch.no_grad():
        proj.weight.add_(0.05 * torch.randn(d, d, dtype=torch.float64))
    batch = _batch(roberta=cls.base_name == "roberta", seed=seed)
    with torch.no_grad():
        t = teacher(*batch, output_hidden_states=True)
    t_out = (_logits(t), t.hidden_states)
    noise = torch.rand(ms.num_masks, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = _step(model, ms, noise, batch, "dense", CompactPolicy(), t_out, proj)
    z = ref[3]
    assert (z.hidden == 0).sum() >= d // 4 and z.ffn[0] == 0 and z.mha[1] == 0 and (z.head[2] == 0).all()
    assert z.mha[2] != 0 and (z.intermediate[2] == 0).sum() >= F_ - 5
    for policy in (CompactPolicy(), ALWAYS_GATHER):
        got = _step(model, ms, noise, batch, "compact", policy, t_out, proj)
        assert got[1].keys() == ref[1].keys()
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        assert got[4] == ref[4]
        torch.testing.assert_close(got[2], ref[2], rtol=1e-9, atol=1e-11)
        for n in ref[1]:
            torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-9, atol=1e-11, msg=lambda m: f"{n}: {m}")
        assert got[5].hidden_index is not None and got[5].hidden_index.numel() == int((z.hidden != 0).sum())
        full = got[5].full_hidden_states(d)
        for a, b in zip(full, ref[5].hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compact_plan_has_one_host_copy(monkeypatch):
    cls = CoFiBertForSequenceClassification
    model = cls(_config(cls)).train()
    ms = _maskset(model, 0).float()
    z = ms.sample(generator=torch.Generator().manual_seed(0))
    calls = []
    orig = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        calls.append(tuple(self.shape))
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    out = model(*_batch(), masks=z, policy=ALWAYS_GATHER)  # training mode: dropout on
    out.logits.sum().backward()
    assert len(calls) == 1, calls
    plan = out.plan
    assert plan.layers[1].attn_skip and plan.layers[0].ffn_skip and plan.layers[2].n_heads == 0
    assert plan.width == int((z.hidden != 0).sum())


def test_skipped_sublayers_are_identity():
    cls = CoFiBertForSequenceClassification
    model = cls(_config(cls)).eval()
    m = Masks.ones(model.mask_config())
    m.mha[:] = 0
    m.ffn[:] = 0
    with torch.no_grad():
        for mode in ("compact", "dense"):
            hs = model(*_batch(), masks=m, backend=mode, output_hidden_states=True).hidden_states
            for h in hs[1:]:
                torch.testing.assert_close(h, hs[0])


@pytest.mark.parametrize("cls", [CoFiBertForSequenceClassification, CoFiRobertaForQuestionAnswering],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("dead", ["hidden", "heads", "ffn_units", "everything"])
def test_compact_equals_dense_when_a_group_keeps_nothing(cls, dead):
    """A sampled mask that keeps no hidden dim (all layers), no head or no FFN unit of a layer:
    compact mode gives dense mode's loss and gradients (it crashed on zero live hidden dims)."""
    torch.manual_seed(0)
    model = cls(_config(cls, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).double().eval()
    teacher = cls(_config(cls)).double().eval()
    ms = _maskset(model, 0)
    with torch.no_grad():
        if dead in ("hidden", "everything"):
            ms.log_alpha_hidden[:] = -30
        if dead in ("heads", "everything"):
            ms.log_alpha_head[:] = -30
        if dead in ("ffn_units", "everything"):
            ms.log_alpha_intermediate[:] = -30
    proj = identity_projection(d, dtype=torch.float64)
    batch = _batch(roberta=cls.base_name == "roberta")
    with torch.no_grad():
        t = teacher(*batch, output_hidden_states=True)
    t_out = (_logits(t), t.hidden_states)
    noise = torch.rand(ms.num_masks, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _step(model, ms, noise, batch, "dense", CompactPolicy(), t_out, proj)
    for policy in (CompactPolicy(), ALWAYS_GATHER):
        got = _step(model, ms, noise, batch, "compact", policy, t_out, proj)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        assert got[4] == ref[4]
        torch.testing.assert_close(got[2], ref[2], rtol=1e-9, atol=1e-11)
        for n in ref[1]:
            torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-9, atol=1e-11, msg=lambda m: f"{n}: {m}")
        if dead in ("hidden", "everything"):
            assert got[5].plan.width == 0
        full = got[5].full_hidden_states(d)
        for a, b in zip(full, ref[5].hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
