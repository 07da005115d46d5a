"""cofi.pruning: the compact model equals the dense-masked model (docs/cofi-reference.md 1.7) exactly."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from masked_forward_ref import masked_forward, random_masks, tiny_hf_model  # noqa: E402

from cofi.masks import Masks  # noqa: E402
from cofi.pruning import mask_values, prune  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _inputs(arch: str, B: int = 3, S: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, S), generator=g)
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[2, 4:] = 0
    ids[am == 0] = 1 if arch == "roberta" else 0
    tt = torch.zeros_like(ids)
    if arch == "bert":
        tt[:, S // 2:] = 1
    return ids, am, tt


def _compare(model, masks, arch, dtype, ids, am, tt):
    with torch.no_grad():
        want, want_hs = masked_forward(model, masks, ids, am, tt)
        compact = prune(model, masks)
        out = compact(ids, am, tt, output_hidden_states=True)
    got = (out.logits,) if out.logits is not None else (out.start_logits, out.end_logits)
    tol = TOL[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    idx = torch.tensor(compact.config.hidden_index)
    assert len(out.hidden_states) == len(want_hs) == model.config.num_hidden_layers + 1
    for g, w in zip(out.hidden_states, want_hs):
        torch.testing.assert_close(g, w[..., idx], atol=tol, rtol=tol)
        # pruned hidden dims are exactly 0 in the masked model
        keep = torch.zeros(w.shape[-1], dtype=torch.bool)
        keep[idx] = True
        assert (w[..., ~keep] == 0).all()
    return compact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("soft", [True, False], ids=["soft", "binary"])
@pytest.mark.parametrize("task", ["cls", "qa"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_compact_equals_masked(arch, task, soft, dtype):
    model = tiny_hf_model(arch, task, dtype, num_labels=3 if task == "cls" else 2)
    masks = {k: v.to(dtype) for k, v in random_masks(model.config, soft, seed=1).items()}
    compact = _compare(model, masks, arch, dtype, *_inputs(arch))
    c = compact.config
    # the structure the masks asked for (see random_masks)
    assert c.num_heads[0] == 0 and c.attention_present[0]  # all heads dead, gate alive: bias only
    assert not c.attention_present[1] and c.num_heads[1] == 0  # MHA gate 0
    assert not c.ffn_present[2]  # FFN gate 0
    assert c.ffn_present[3] and c.intermediate_sizes[3] == 0  # issue 36: bias-only FFN
    assert not c.attention_present[4] and not c.ffn_present[4]  # whole layer gone
    assert c.hidden_size == int((masks["hidden"] != 0).sum()) < model.config.hidden_size
    assert compact.embeddings.word_embeddings.weight.dtype == dtype


@pytest.mark.parametrize("seed", range(4))
def test_random_masks_many_seeds(seed):
    arch = "bert" if seed % 2 == 0 else "roberta"
    model = tiny_hf_model(arch, "cls", torch.float64, seed=seed, L=3, H=2, d=16, Fi=20)
    masks = random_masks(model.config, soft=seed < 2, seed=100 + seed, kill=("hidden",))
    _compare(model, masks, arch, torch.float64, *_inputs(arch, seed=seed))


def test_cofi_masks_dataclass_and_reference_zs():
    """Accepts cofi.masks.Masks and the reference's zs dict (head_z [L,1,H,1,1] etc.)."""
    model = tiny_hf_model("bert", "cls", torch.float64)
    m = random_masks(model.config, True, seed=3)
    L, H, Fi = 5, 4, 48
    zs = {"hidden_z": m["hidden"], "head_z": m["head"].view(L, 1, H, 1, 1), "head_layer_z": m["mha"],
          "intermediate_z": m["intermediate"].view(L, 1, 1, Fi), "mlp_z": m["ffn"]}
    ids, am, tt = _inputs("bert")
    with torch.no_grad():
        a = prune(model, m)(ids, am, tt).logits
        b = prune(model, zs)(ids, am, tt).logits
        c = prune(model, Masks(**m))(ids, am, tt).logits
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_masks_equals_transformers():
    for arch in ("bert", "roberta"):
        model = tiny_hf_model(arch, "cls", torch.float32)
        ids, am, tt = _inputs(arch)
        if arch == "roberta":
            tt = torch.zeros_like(ids)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
            compact = prune(model, None)
            got = compact(ids, am, tt).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert compact.num_encoder_params() == compact.config.full_encoder_params()
        assert compact.sparsity() == 0.0


def test_partial_groups_and_distill_projection():
    """Only some groups given (others = ones); the distillation projection loses pruned columns."""
    model = tiny_hf_model("roberta", "cls", torch.float64)
    m = random_masks(model.config, True, seed=5)
    masks = {"hidden": m["hidden"], "intermediate": m["intermediate"]}
    proj = torch.nn.Linear(32, 40).double()
    ids, am, tt = _inputs("roberta")
    tt = torch.zeros_like(ids)
    with torch.no_grad():
        want, want_hs = masked_forward(model, masks, ids, am, tt)
        compact = prune(model, masks, layer_transformation=proj)
        out = compact(ids, am, tt, output_hidden_states=True)
        torch.testing.assert_close(out.logits, want[0], atol=1e-10, rtol=1e-10)
        for g, w in zip(out.hidden_states, want_hs):
            torch.testing.assert_close(compact.layer_transformation(g), proj(w), atol=1e-10, rtol=1e-10)
    assert compact.config.distill_proj_size == 40
    assert all(compact.config.attention_present) and all(compact.config.ffn_present)


def test_sparsity_counts_kept_parameters():
    model = tiny_hf_model("bert", "cls", torch.float32)
    m = random_masks(model.config, False, seed=1)
    compact = prune(model, m)
    c = compact.config
    d, D = c.hidden_size, c.head_dim
    want = 0
    for i in range(c.num_layers):
        if c.attention_present[i]:
            w = c.num_heads[i] * D
            want += 4 * w * d + 3 * w + d + 2 * d
        if c.ffn_present[i]:
            f = c.intermediate_sizes[i]
            want += 2 * f * d + f + d + 2 * d
    assert compact.num_encoder_params() == want
    assert 0 < compact.sparsity() < 1


def test_bad_masks_raise():
    model = tiny_hf_model("bert", "cls", torch.float32)
    with pytest.raises(ValueError, match="masks.head"):
        prune(model, {"head": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="masks.hidden"):
        prune(model, {"hidden": torch.zeros(32)})
    with pytest.raises(ValueError, match="masks.ffn"):
        prune(model, {"ffn": -torch.ones(5)})
    assert mask_values(None, 2, 2, 4, 3)["head"].shape == (2, 2)


@pytest.mark.parametrize("mode", ["dense", "compact"])
@pytest.mark.parametrize("arch,task,soft", [("bert", "cls", True), ("roberta", "qa", False)])
def test_matches_cofi_models(arch, task, soft, mode):
    """Same check against cofi.models' own masked forward (dense = the reference's method)."""
    models = pytest.importorskip("cofi.models")
    from cofi.masks import Masks

    hf = tiny_hf_model(arch, task, torch.float64, num_labels=3 if task == "cls" else 2)
    name = {"bert": "Bert", "roberta": "Roberta"}[arch] + ("ForSequenceClassification" if task == "cls" else "ForQuestionAnswering")
    model = getattr(models, "CoFi" + name)(hf.config).double().eval()
    model.load_state_dict(hf.state_dict(), strict=False)
    masks = Masks(**random_masks(hf.config, soft, seed=2))
    ids, am, tt = _inputs(arch)
    if arch == "roberta":
        tt = torch.zeros_like(ids)
    with torch.no_grad():
        want = model(ids, am, tt, masks=masks, backend=mode)
        got = prune(model, masks)(ids, am, tt)
    for g, w in zip(_heads(got), _heads(want)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def _heads(o):
    return (o.logits,) if o.logits is not None else (o.start_logits, o.end_logits)
