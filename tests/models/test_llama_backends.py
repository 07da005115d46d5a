"""The masked Llama's two backends (cofi.models.llama): ``compact`` (live units only, cofi's fused
ops) equals ``dense`` (full width, masks multiplied, reference ops) in float64, values and
gradients, for random masks with dead heads, K/V groups, units, hidden dims and layers; compact
really computes only the live units.

Gradients are compared everywhere except at mask entries that are exactly 0: a layer gate at 0 is
skipped by compact (gradient 0) and multiplied by dense (its analytic gradient); hard-concrete's
clip makes both 0 in training (docstring of cofi.models.llama).
"""
from __future__ import annotations

import pytest
import torch
from cofi.errors import UserError
from cofi.masks.decoder import DecoderMasks, DecoderShape
from cofi.models import llama as llama_mod
from models.test_llama import V, _pair, _random_masks, _rel  # tests/ is on the path (pyproject)


def _structured(s: DecoderShape) -> DecoderMasks:
    """Soft values; layer 0: ragged heads per group (1 and 3), layer 1: K/V group 0 dead and one
    head of group 1 dead (uniform: 2 heads in the one group), layer 2: both sublayers removed."""
    g = torch.Generator().manual_seed(11)
    m = DecoderMasks.ones(s, torch.float64).map(lambda t: t * (0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype)))
    m.head[0, [0, 1]] = 0.0
    m.kv[1, 0] = 0.0
    m.head[1, 3] = 0.0
    m.mha[2] = m.ffn[2] = 0.0
    m.intermediate[1, ::3] = 0.0
    m.hidden[::5] = 0.0
    return m


def _run(m, ids, am, masks: DecoderMasks, backend: str):
    mk = masks.map(lambda t: t.clone().requires_grad_(True))
    m.zero_grad(set_to_none=True)
    out = m(ids, attention_mask=am, masks=mk, output_hidden_states=True, backend=backend)
    keep = am.bool()[..., None] if am is not None else 1.0
    loss = (out.logits * keep).square().sum() + sum((h * keep).pow(2).sum() * 1e-2 for h in out.hidden_states)
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}
    mgrads = {k: t.grad if t.grad is not None else torch.zeros_like(t) for k, t in mk.items()}
    return out, grads, mgrads


@pytest.mark.parametrize("kind,tie,which", [("llama", True, "structured"), ("qwen2", False, "hard"),
                                            ("llama_bias", False, "soft")])
def test_compact_equals_dense_values_and_grads(kind, tie, which):
    _, m = _pair(kind, seed=1, tie_word_embeddings=tie)
    m.train()  # attention_dropout is 0 in these configs: train mode changes nothing but is the real use
    s = m.shape
    masks = _structured(s) if which == "structured" else _random_masks(s, seed=3, soft=which == "soft")
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 11, dtype=torch.long)
    am[1, 7:] = 0  # right padding
    (d, gd, md), (c, gc, mc) = (_run(m, ids, am, masks, b) for b in ("dense", "compact"))
    keep = am.bool()
    assert _rel(c.logits[keep], d.logits[keep]) <= 1e-10
    assert _rel(c.last_hidden[keep], d.last_hidden[keep]) <= 1e-10
    for a, b in zip(c.hidden_states, d.hidden_states):
        assert a.shape == b.shape == (2, 11, s.hidden_size)
        assert float((a - b).detach()[keep].abs().max()) <= 1e-10 * float(b.detach()[keep].abs().max())
    for n in gd:
        assert float((gc[n] - gd[n]).abs().max()) <= 1e-10 * max(float(gd[n].abs().max()), 1.0), n
    for g, t in masks.items():
        live = t != 0
        assert _rel(mc[g][live], md[g][live]) <= 1e-10, g
        assert float(mc[g][~live].abs().sum()) == 0.0, g


def test_compact_computes_only_live_units(monkeypatch):
    _, m = _pair("llama", seed=2)
    s = m.shape
    masks = _structured(s)
    seen: list[tuple[str, tuple[int, ...]]] = []
    att, ffn = llama_mod.masked_attention, llama_mod.masked_ffn

    def spy_att(q, k, v, *a, **kw):
        seen.append(("attn", (q.shape[1], k.shape[1])))
        return att(q, k, v, *a, **kw)

    def spy_ffn(x, w1, *a, live_idx=None, **kw):
        seen.append(("ffn", (x.shape[-1], int(live_idx.numel()))))
        return ffn(x, w1, *a, live_idx=live_idx, **kw)

    monkeypatch.setattr(llama_mod, "masked_attention", spy_att)
    monkeypatch.setattr(llama_mod, "masked_ffn", spy_ffn)
    with torch.no_grad():
        out = m(torch.randint(0, V, (1, 6)), masks=masks)
    d_kept = int((masks.hidden != 0).sum())
    F_ = s.intermediate_size
    assert out.plan.hidden_idx.numel() == d_kept
    # layer 0: 4 query heads, ragged (each gets its own K/V copy); layer 1: 2 heads on 1 group; layer 2 skipped
    assert seen == [("attn", (4, 4)), ("ffn", (d_kept, F_)), ("attn", (2, 1)),
                    ("ffn", (d_kept, F_ - len(range(0, F_, 3))))]


def test_dense_backend_has_no_plan_and_bad_backend_refused():
    _, m = _pair("llama", seed=3)
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        assert m(ids, backend="dense").plan is None
        m.backend = "dense"
        assert m(ids).plan is None
    with pytest.raises(UserError, match=r"backend must be one of \('compact', 'dense'\), got 'sparse'"):
        m(ids, backend="sparse")


def test_no_kept_hidden_dim_gives_zeros():
    _, m = _pair("llama", seed=4)
    masks = DecoderMasks.ones(m.shape, torch.float64)
    masks.hidden.zero_()
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        c, d = m(ids, masks=masks), m(ids, masks=masks, backend="dense")
    assert torch.equal(c.logits, d.logits) and not c.logits.any()
