"""One activation table (cofi.vocab.HF_ACTIVATIONS) for the masked models and the runtime: a model the
masked side accepts also folds and runs (gelu_fast trained, then failed in the runtime before)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from masked_forward_ref import tiny_hf_model  # noqa: E402

from cofi import vocab  # noqa: E402
from cofi.masks import MaskConfig, MaskSet  # noqa: E402
from cofi.models import CoFiBertForSequenceClassification  # noqa: E402
from cofi.ops.reference.masked_ffn import activation_ref  # noqa: E402
from cofi.pruning import prune  # noqa: E402
from cofi.runtime import CompactConfig  # noqa: E402


def test_hf_activations_match_transformers():
    """Each HF name computes what transformers computes (float64; gelu_fast rounds sqrt(2/pi) to 10 digits)."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for hf, op in vocab.HF_ACTIVATIONS.items():
        assert op in vocab.OP_ACTIVATIONS
        if hf in ACT2FN:
            torch.testing.assert_close(activation_ref(x, op), ACT2FN[hf](x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("act", ["gelu_fast", "gelu_new", "relu"])
def test_masked_model_trains_and_folds(act):
    hf = tiny_hf_model("bert", "cls", torch.float64)
    hf.config.hidden_act = act
    model = CoFiBertForSequenceClassification(hf.config).double()
    model.load_state_dict(hf.state_dict(), strict=False)
    ms = MaskSet(MaskConfig.from_hf_config(hf.config, init_mean="uniform")).double()
    opt = torch.optim.SGD(list(model.parameters()) + list(ms.parameters()), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (4, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    tt = torch.zeros_like(ids)
    model.train()
    loss = model(ids, am, tt, masks=ms.sample(generator=g)).logits.square().mean() + ms.lagrangian(0.5)[0]
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        masks = ms.deterministic()
        masks.head[0, 1] = 0
        masks.intermediate[1, :20] = 0
        want = model(ids, am, tt, masks=masks).logits
        compact = prune(model, masks)
        got = compact(ids, am, tt).logits
    assert compact.config.hidden_act == act
    assert CompactConfig.from_dict(compact.config.to_dict()).hidden_act == act
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
