"""Test helpers: the dense-masked forward of docs/cofi-reference.md 1.7 on HF-named weights, tiny HF models
and random CoFi-like masks. (Stand-in for cofi.models' backend="dense" until that package lands.)"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cofi.ops.reference import masked_attention_ref, masked_ffn_ref, masked_layer_norm_ref

ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}


def masked_forward(model, masks: dict | None, input_ids, attention_mask=None, token_type_ids=None):
    """Dense masked forward. masks: dict hidden [d], head [L,H], mha [L], intermediate [L,F], ffn [L]
    (any missing). Returns (head outputs tuple, hidden_states list of [B,S,d]).

    Mask points (1.7): embeddings e*z -> LN over kept dims -> *z; ctx*head_z before W_O;
    (W_O ctx + b_O)*mha_z; act(W_1 x + b_1)*int_z; (W_2 a + b_2)*mlp_z; each sublayer output goes
    through masked LN(h*z + residual)*z. A sublayer is skipped (with its LN) iff its gate is exactly 0.
    """
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    pre = "bert." if any(k.startswith("bert.") for k in sd) else "roberta."
    m = masks or {}
    L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    D = d // H
    eps = cfg.layer_norm_eps
    dt = sd[pre + "embeddings.word_embeddings.weight"].dtype
    hz = m.get("hidden")
    B, S = input_ids.shape
    if pre == "roberta.":
        keep = input_ids.ne(cfg.pad_token_id).long()
        pos = torch.cumsum(keep, 1) * keep + cfg.pad_token_id
    else:
        pos = torch.arange(S)[None]
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    E = pre + "embeddings."
    e = (sd[E + "word_embeddings.weight"][input_ids] + sd[E + "token_type_embeddings.weight"][token_type_ids]
         + sd[E + "position_embeddings.weight"][pos])
    x = masked_layer_norm_ref(e, None, sd[E + "LayerNorm.weight"], sd[E + "LayerNorm.bias"], hz, eps)
    kpm = None if attention_mask is None else attention_mask.bool()
    hs = [x]
    for i in range(L):
        P = f"{pre}encoder.layer.{i}."
        gate = m["mha"][i] if "mha" in m else None
        if gate is None or gate != 0:
            q, k, v = (F.linear(x, sd[P + f"attention.self.{n}.weight"], sd[P + f"attention.self.{n}.bias"])
                       .view(B, S, H, D).transpose(1, 2) for n in ("query", "key", "value"))
            ctx = masked_attention_ref(q, k, v, m["head"][i] if "head" in m else None, kpm, 1 / math.sqrt(D))
            h = F.linear(ctx.transpose(1, 2).reshape(B, S, d), sd[P + "attention.output.dense.weight"],
                         sd[P + "attention.output.dense.bias"])
            if gate is not None:
                h = h * gate
            x = masked_layer_norm_ref(h, x, sd[P + "attention.output.LayerNorm.weight"],
                                      sd[P + "attention.output.LayerNorm.bias"], hz, eps)
        gate = m["ffn"][i] if "ffn" in m else None
        if gate is None or gate != 0:
            y = masked_ffn_ref(x, sd[P + "intermediate.dense.weight"], sd[P + "intermediate.dense.bias"],
                               sd[P + "output.dense.weight"], sd[P + "output.dense.bias"],
                               m["intermediate"][i] if "intermediate" in m else None, gate,
                               ACT[cfg.hidden_act])
            x = masked_layer_norm_ref(y, x, sd[P + "output.LayerNorm.weight"],
                                      sd[P + "output.LayerNorm.bias"], hz, eps)
        hs.append(x)
    if "qa_outputs.weight" in sd:
        se = F.linear(x, sd["qa_outputs.weight"], sd["qa_outputs.bias"])
        out = (se[..., 0], se[..., 1])
    elif pre == "bert.":
        p = torch.tanh(F.linear(x[:, 0], sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"]))
        out = (F.linear(p, sd["classifier.weight"], sd["classifier.bias"]),)
    else:
        p = torch.tanh(F.linear(x[:, 0], sd["classifier.dense.weight"], sd["classifier.dense.bias"]))
        out = (F.linear(p, sd["classifier.out_proj.weight"], sd["classifier.out_proj.bias"]),)
    assert all(t.dtype == dt for t in out)
    return out, hs


def tiny_hf_model(arch: str = "bert", task: str = "cls", dtype=torch.float32, seed: int = 0, L: int = 5,
                  H: int = 4, d: int = 32, Fi: int = 48, num_labels: int = 3):
    """Random tiny transformers model (no downloads), eval mode, eager attention."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
              intermediate_size=Fi, max_position_embeddings=64, num_labels=num_labels,
              attn_implementation="eager")
    if arch == "bert":
        cfg = tf.BertConfig(**kw)
        cls = tf.BertForSequenceClassification if task == "cls" else tf.BertForQuestionAnswering
    else:
        cfg = tf.RobertaConfig(pad_token_id=1, type_vocab_size=1, **kw)
        cls = tf.RobertaForSequenceClassification if task == "cls" else tf.RobertaForQuestionAnswering
    model = cls(cfg).eval().to(dtype)
    with torch.no_grad():  # non-trivial LN affine and biases so folding errors show
        for n, p in model.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def random_masks(cfg, soft: bool, seed: int, kill=("layer_mha", "layer_ffn", "whole_layer", "all_heads", "all_units",
                                                    "hidden")):
    """CoFi-like deterministic masks (float64, cast later). Kills, when named, in distinct layers:
    layer 0: all heads dead (MHA gate alive -> bias-only attention); layer 1: MHA gate 0;
    layer 2: FFN gate 0; layer 3: all intermediate dead, FFN gate alive (issue 36); layer 4 (L>=5): both gates 0 ...
    plus ~40% random heads/units and ~25% hidden dims dead. Soft values in [0.3, 1]."""
    g = torch.Generator().manual_seed(seed)
    L, H, d, Fi = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.intermediate_size

    def val(shape, p_dead):
        v = torch.rand(shape, generator=g, dtype=torch.float64) * 0.7 + 0.3 if soft else torch.ones(shape, dtype=torch.float64)
        return torch.where(torch.rand(shape, generator=g, dtype=torch.float64) < p_dead, torch.zeros_like(v), v)

    m = {"hidden": val((d,), 0.25 if "hidden" in kill else 0.0), "head": val((L, H), 0.4),
         "mha": val((L,), 0.0), "intermediate": val((L, Fi), 0.4), "ffn": val((L,), 0.0)}
    if "all_heads" in kill:
        m["head"][0] = 0
    if "layer_mha" in kill:
        m["mha"][1] = 0
    if "layer_ffn" in kill:
        m["ffn"][2] = 0
    if "all_units" in kill:
        m["intermediate"][3 % L] = 0
    if "whole_layer" in kill and L >= 5:
        m["mha"][4] = 0
        m["ffn"][4] = 0
    if m["hidden"].sum() == 0:
        m["hidden"][0] = 1.0
    return m
