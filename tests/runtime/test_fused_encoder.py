"""cofi::compact_encoder_fwd (the compact model's encoder in one native call) vs the per-op path."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
from masked_forward_ref import random_masks, tiny_hf_model  # noqa: E402

import cofi.ops  # noqa: E402
from cofi import _ext  # noqa: E402
from cofi.pruning import prune  # noqa: E402
from cofi.runtime import _fused  # noqa: E402
from cofi.runtime.export import example_inputs  # noqa: E402

needs_native = pytest.mark.skipif(not _ext.has_kernel("compact_encoder_fwd", "CompositeExplicitAutograd"),
                                  reason="cofi._C without compact_encoder_fwd")


def _compact(arch="bert", task="cls", dtype=torch.float64, seed=1):
    model = tiny_hf_model(arch, task, dtype, num_labels=3 if task == "cls" else 2)
    return prune(model, random_masks(model.config, True, seed))


def _outs(o):
    return (o.logits,) if o.logits is not None else (o.start_logits, o.end_logits)


def _ragged(dtype=torch.float64):
    """A structure with every case: full, partial, zero-width (bias-only) and absent sublayers."""
    model = tiny_hf_model("bert", "cls", dtype, num_labels=3)
    m = random_masks(model.config, True, 5)
    L = model.config.num_hidden_layers
    m["mha"][:] = 1
    m["ffn"][:] = 1
    m["head"][0] = 1  # all heads
    m["head"][1] = 0  # MHA gate alive, every head dead: bias only
    m["mha"][2] = 0  # attention sublayer gone
    m["intermediate"][0] = 1
    m["intermediate"][1] = 0  # FFN bias only (reference issue 36)
    m["ffn"][L - 1] = 0  # FFN sublayer gone
    return prune(model, m)


@needs_native
@pytest.mark.parametrize("arch,task,dtype,seed,pad", [
    ("bert", "cls", torch.float64, 1, None), ("roberta", "qa", torch.float64, 2, None),
    ("bert", "cls", torch.float32, 3, 16), ("roberta", "cls", torch.float64, 4, 8)])
def test_fused_equals_per_op(arch, task, dtype, seed, pad):
    c = _compact(arch, task, dtype, seed)
    if pad:
        c.pad_(pad)
    for batch, seq in ((3, 11), (1, 7)):
        inp = example_inputs(c, batch=batch, seq=seq)
        with torch.no_grad():
            c.set_backend("ops")
            want = c(*inp, output_hidden_states=True)
            assert c.last_backend == "ops"
            c.set_backend("auto")
            got = c(*inp, output_hidden_states=True)
            assert c.last_backend == "fused" and cofi.ops.last_backend("compact_encoder") == "native"
            last_only = c(*inp)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b, b1 in zip(_outs(want), _outs(got), _outs(last_only)):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)
            torch.testing.assert_close(b1, a, atol=tol, rtol=tol)
        assert len(got.hidden_states) == c.config.num_layers + 1
        for a, b in zip(want.hidden_states, got.hidden_states):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)


@needs_native
def test_fused_every_sublayer_kind():
    c = _ragged()
    cfg = c.config
    assert cfg.num_heads[0] > 0 and cfg.num_heads[1] == 0 and cfg.attention_present[1]
    assert not cfg.attention_present[2] and cfg.intermediate_sizes[1] == 0 and cfg.ffn_present[1]
    assert not cfg.ffn_present[-1]
    inp = example_inputs(c, batch=4, seq=9)
    with torch.no_grad():
        want = c.set_backend("ops")(*inp, output_hidden_states=True)
        got = c.set_backend("fused")(*inp, output_hidden_states=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-12, rtol=1e-12)
    for a, b in zip(want.hidden_states, got.hidden_states):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)


@needs_native
def test_fused_only_without_grad_and_without_forced_backend():
    c = _compact()
    inp = example_inputs(c, batch=2, seq=6)
    out = c(*inp)  # grad enabled, parameters require grad: per-op path with autograd
    assert c.last_backend == "ops" and out.logits.requires_grad
    with torch.no_grad(), cofi.ops.use_backend("reference"):
        c(*inp)
        assert c.last_backend == "ops"
        assert any("backend 'reference' forced" in w for w in _fused.reasons(c))
    with torch.inference_mode():
        c(*inp)
        assert c.last_backend == "fused"
    c.set_backend("torch")
    with torch.no_grad():
        c(*inp)
        assert c.last_backend == "torch" and "backend is 'torch' (plain aten ops)" in _fused.reasons(c)
    with pytest.raises(RuntimeError, match="backend 'fused' cannot run: a gradient is needed"):
        c.set_backend("fused")(*inp)
    with pytest.raises(ValueError, match="backend must be one of"):
        c.set_backend("fast")


@needs_native
def test_fused_op_checks_and_opcheck():
    c = _compact(dtype=torch.float32)
    params, heads, widths, present = _fused.flat_params(c)
    d = c.config.hidden_size
    x = torch.randn(2, 5, d)
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1, 3:] = False
    for all_hidden, unpad, cls_only in ((True, False, False), (True, True, False), (False, False, True),
                                        (False, True, True)):
        args = (x, kpm, params, heads, widths, present, c.config.head_dim, 0, 1e-12, None, all_hidden, unpad,
                cls_only)
        torch.library.opcheck(torch.ops.cofi.compact_encoder_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="cls_only returns the position-0 rows alone"):
        torch.ops.cofi.compact_encoder_fwd(*args[:10], True, False, True)
    with pytest.raises(RuntimeError, match="params ran out at layer"):
        torch.ops.cofi.compact_encoder_fwd(x, kpm, params[:-1], heads, widths, present, c.config.head_dim, 0, 1e-12, None, False, False, False)
    with pytest.raises(RuntimeError, match=r"x must be \[B, S, d\]"):
        torch.ops.cofi.compact_encoder_fwd(x[0], None, params, heads, widths, present, c.config.head_dim, 0, 1e-12, None, False, False, False)
    i = next(k for k, p in enumerate(present) if p & 1 and heads[k])
    bad = list(heads)
    bad[i] += 1
    with pytest.raises(RuntimeError, match=f"layer {i} qkv_weight must have shape"):
        torch.ops.cofi.compact_encoder_fwd(x, None, params, bad, widths, present, c.config.head_dim, 0, 1e-12, None, False, False, False)


@needs_native
@pytest.mark.parametrize("arch,task,pad", [("bert", "cls", None), ("roberta", "qa", 16)])
def test_unpad_same_at_real_tokens_zero_at_padding(arch, task, pad):
    c = _compact(arch, task, torch.float64, seed=6)
    if pad:
        c.pad_(pad)
    ids, am, tt = example_inputs(c, batch=4, seq=10)
    am[0, 7:] = 0
    am[2, 1:] = 0
    real = am.bool()
    with torch.no_grad():
        want = c.set_backend("ops")(ids, am, tt, output_hidden_states=True)
        c.set_unpad(True)
        per_op = c(ids, am, tt, output_hidden_states=True)
        fused = c.set_backend("fused")(ids, am, tt, output_hidden_states=True)
        full = c(ids, torch.ones_like(am), tt)  # no padding: nothing to skip
        c.set_unpad(False)
        full_ref = c(ids, torch.ones_like(am), tt)
    for a, b in zip(_outs(full_ref), _outs(full)):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
    for h_want, h_per_op, h_fused in zip(want.hidden_states[1:], per_op.hidden_states[1:], fused.hidden_states[1:]):
        torch.testing.assert_close(h_fused[real], h_want[real], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(h_fused, h_per_op, atol=1e-12, rtol=1e-12)
        assert h_fused[~real].abs().max() == 0
    if task == "cls":
        torch.testing.assert_close(fused.logits, want.logits, atol=1e-12, rtol=1e-12)
    else:
        torch.testing.assert_close(fused.start_logits[real], want.start_logits[real], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(fused.start_logits, per_op.start_logits, atol=1e-12, rtol=1e-12)


def _structure(kind: str, dtype=torch.float64):
    """'tail': attention only in layer 0 (FFN-only layers after it, as CoFi's high-sparsity
    structures); 'none': no attention at all; 'last': heads in the last layer."""
    model = tiny_hf_model("bert", "cls", dtype, num_labels=3)
    m = random_masks(model.config, True, 7, kill=("hidden",))
    L = model.config.num_hidden_layers
    if kind in ("tail", "none"):
        m["mha"][1:] = 0
        if kind == "none":
            m["mha"][0] = 0
        m["ffn"][L - 2] = 1
        m["intermediate"][L - 2] = 0  # a bias-only FFN in the tail
    else:
        m["head"][L - 1, 0] = 1
    return prune(model, m)


@needs_native
@pytest.mark.parametrize("kind", ["tail", "none", "last"])
@pytest.mark.parametrize("unpad", [False, True])
def test_cls_tail_same_logits(kind, unpad):
    c = _structure(kind).set_unpad(unpad)
    ids, am, tt = example_inputs(c, batch=5, seq=9)
    am[1, 5:] = 0
    am[3, 0] = 0  # a padded position 0 (left padding): its output is 0 under unpadding
    with torch.no_grad():
        want = c.set_backend("ops")(ids, am, tt).logits
        c.set_backend("auto")
        got = c(ids, am, tt).logits
        hs = c.encode(ids, am, tt, all_hidden_states=False, cls_only=True)[-1]
        full = c.set_cls_tail(False)(ids, am, tt).logits
    assert c.last_backend == "fused" and hs.shape == (5, 1, c.config.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(full, want, atol=1e-12, rtol=1e-12)
    if unpad:
        assert hs[3].abs().max() == 0


@needs_native
@pytest.mark.parametrize("arch,types,pad", [("bert", True, None), ("bert", False, 16), ("roberta", False, None)])
def test_fused_embeddings_equal_module_and_opcheck(arch, types, pad):
    """cofi::compact_embeddings_fwd vs CompactEmbeddings.forward (lookup + the public LayerNorm op), in
    float64 with hidden dims pruned, RoBERTa positions from padding, token types given or not."""
    c = _compact(arch, "cls", torch.float64, seed=6)
    if pad:
        c.pad_(pad)
    assert c.embeddings.hidden_z is not None or pad is None
    ids, _, tt = example_inputs(c, batch=3, seq=10)
    if types and c.config.type_vocab_size > 1:
        tt[:, 5:] = 1
    tt = tt if types else None
    with torch.no_grad():
        want = c.embeddings(ids, tt)
        got = _fused.embed(c, ids, tt)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    emb = c.embeddings
    pos = emb.position_ids(ids) if arch == "roberta" else None
    args = (ids, tt, pos, emb.word_embeddings.weight.detach(), emb.position_embeddings.weight.detach(),
            emb.token_type_embeddings.weight.detach(), emb.ln_weight.detach(), emb.ln_bias.detach(), emb.hidden_z,
            float(emb.eps))
    torch.library.opcheck(torch.ops.cofi.compact_embeddings_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@needs_native
def test_fused_embeddings_bad_input():
    c = _compact("bert", "cls", torch.float32)
    emb = c.embeddings
    w, p, t = (m.weight.detach() for m in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings))
    ln = (emb.ln_weight.detach(), emb.ln_bias.detach(), None, 1e-12)
    ids = torch.randint(0, 90, (2, 7))
    op = torch.ops.cofi.compact_embeddings_fwd
    with pytest.raises(RuntimeError, match=r"input_ids must be \[B, S\], got \[14\]"):
        op(ids.reshape(-1), None, None, w, p, t, *ln)
    with pytest.raises(RuntimeError, match=r"token_type_ids must have the shape of input_ids \[2, 7\], got \[2, 6\]"):
        op(ids, ids[:, :6], None, w, p, t, *ln)
    with pytest.raises(RuntimeError, match="input_ids must be an integer tensor, got Float"):
        op(ids.float(), None, None, w, p, t, *ln)
    with pytest.raises(RuntimeError, match="position_embeddings must match word_embeddings' dtype"):
        op(ids, None, None, w, p.double(), t, *ln)
    with pytest.raises(RuntimeError, match=r"sequence length 70 exceeds the 64 position embeddings"):
        op(torch.zeros(1, 70, dtype=torch.long), None, None, w, p, t, *ln)
    with pytest.raises(IndexError, match="out of range"):
        op(ids + 1000, None, None, w, p, t, *ln)
