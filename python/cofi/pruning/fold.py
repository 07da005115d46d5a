"""Fold deterministic mask values into weights and cut dead units: masked model -> CompactModel.

Exact for soft values too. The masked model (docs/cofi-reference.md 1.7) computes, with hidden gate z:
  residual r_0 = z * LN_K(z * e)                       (embeddings; LN_K = stats over kept dims K)
  sublayer:  r' = z * LN_K(z * g * (W x + b) + r)      (g = MHA/FFN gate, head/int values inside)
so every residual stream is z times an LN output and is 0 outside K. The compact model stores
r[K] directly by folding z[K] into each LayerNorm's weight and bias, and folds z[K] * g (and the
head / intermediate values) into the output rows/columns of W_O, b_O, W_2, b_2 and into the
embedding tables; inputs of Q/K/V, W_1, pooler/classifier/QA head and the distillation projection
only lose the columns outside K (their inputs are already scaled). Nothing is approximated: the
compact forward is the masked forward restricted to live units.

Rule for dead units under a live gate (reference issue 36): a sublayer is removed iff its layer
gate is exactly 0. If the gate is alive but every head (or every intermediate unit) is 0, the masked
forward still adds g * b_O (g * b_2) and applies the LayerNorm, so the compact model keeps a
"bias-only" sublayer (``attention_present``/``ffn_present`` True with width 0) computing
LN(residual + folded bias). cofi.models' dense and compact modes follow the same rule (gate-only
skipping, per the models contract).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..runtime.config import CompactConfig
from ..runtime.modeling import CompactModel
from ..vocab import GROUPS, REFERENCE_Z_NAMES, group_shapes


def mask_values(masks: Any, num_layers: int, num_heads: int, hidden: int,
                intermediate: int) -> dict[str, torch.Tensor]:
    """Deterministic mask values as float64 CPU tensors of canonical shapes
    hidden [d], head [L, H], mha [L], intermediate [L, F], ffn [L]; a missing group is all ones.

    ``masks``: a ``cofi.masks.Masks`` (attributes hidden/head/mha/intermediate/ffn), a dict with those
    keys, or the reference's zs dict (hidden_z, head_z, head_layer_z, intermediate_z, mlp_z), or None.
    """
    shapes = group_shapes(num_layers, hidden, num_heads, intermediate)
    if masks is None:
        raw: dict[str, Any] = {}
    elif isinstance(masks, Mapping):
        raw = {REFERENCE_Z_NAMES.get(k, k): v for k, v in masks.items()}
    else:
        raw = {g: getattr(masks, g, None) for g in GROUPS}
    out = {}
    for g in GROUPS:
        v = raw.get(g)
        if v is None:
            out[g] = torch.ones(shapes[g], dtype=torch.float64)
            continue
        t = torch.as_tensor(v).detach().to("cpu", torch.float64)
        if t.numel() != torch.Size(shapes[g]).numel():
            raise ValueError(f"cofi.pruning: masks.{g} must have shape {shapes[g]}, got {tuple(t.shape)}")
        t = t.reshape(shapes[g])
        if not torch.isfinite(t).all() or (t < 0).any():
            raise ValueError(f"cofi.pruning: masks.{g} must be finite and >= 0 (deterministic values)")
        out[g] = t
    return out


def _prefix(sd: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    for p, mt in (("bert.", "bert"), ("roberta.", "roberta")):
        if any(k.startswith(p + "embeddings.") for k in sd):
            return p, mt
    raise ValueError("cofi.pruning: state dict must hold HF names starting with 'bert.embeddings.' "
                     "or 'roberta.embeddings.'")


def prune_state_dict(state_dict: Mapping[str, torch.Tensor], hf_config: Any, masks: Any,
                     dtype: torch.dtype | None = None) -> tuple[CompactConfig, dict[str, torch.Tensor]]:
    """Fold + cut. ``state_dict``: HF-named weights of a (CoFi or HF) BERT/RoBERTa sequence
    classification or QA model, optionally with ``layer_transformation.*`` (distillation
    projection). Returns the compact config and the CompactModel state dict (folded in float64,
    cast to ``dtype`` or the weights' own dtype)."""
    sd = {k: v.detach().to("cpu") for k, v in state_dict.items()}
    pre, model_type = _prefix(sd)
    E = pre + "embeddings."
    L = hf_config.num_hidden_layers
    H = hf_config.num_attention_heads
    d = hf_config.hidden_size
    Fi = hf_config.intermediate_size
    D = d // H
    out_dtype = dtype or sd[E + "word_embeddings.weight"].dtype
    z = mask_values(masks, L, H, d, Fi)
    zh = z["hidden"]
    K = torch.nonzero(zh != 0).flatten()
    if K.numel() == 0:
        raise ValueError("cofi.pruning: masks.hidden prunes every hidden dim; nothing to run")
    zK = zh[K]

    def g(name: str) -> torch.Tensor:
        return sd[name].to(torch.float64)

    new: dict[str, torch.Tensor] = {}
    for t in ("word", "position", "token_type"):
        new[f"embeddings.{t}_embeddings.weight"] = g(f"{E}{t}_embeddings.weight")[:, K] * zK
    new["embeddings.ln_weight"] = g(E + "LayerNorm.weight")[K] * zK
    new["embeddings.ln_bias"] = g(E + "LayerNorm.bias")[K] * zK

    num_heads, attn_present, widths, ffn_present, kept_heads = [], [], [], [], []
    for i in range(L):
        P = f"{pre}encoder.layer.{i}."
        o = f"layers.{i}."
        # ---- attention
        gate = z["mha"][i]
        heads = torch.nonzero(z["head"][i] != 0).flatten() if gate != 0 else torch.zeros(0, dtype=torch.long)
        attn_present.append(bool(gate != 0))
        num_heads.append(int(heads.numel()))
        kept_heads.append([int(h) for h in heads])
        if gate != 0:
            a = o + "attention."
            if heads.numel():
                cols = (heads[:, None] * D + torch.arange(D)[None, :]).flatten()
                parts_w = [g(P + f"attention.self.{n}.weight")[cols][:, K] for n in ("query", "key", "value")]
                parts_b = [g(P + f"attention.self.{n}.bias")[cols] for n in ("query", "key", "value")]
                new[a + "qkv_weight"] = torch.cat(parts_w)
                new[a + "qkv_bias"] = torch.cat(parts_b)
                col_scale = z["head"][i].repeat_interleave(D)[cols]
                new[a + "out_weight"] = (g(P + "attention.output.dense.weight")[K][:, cols]
                                         * (gate * zK)[:, None] * col_scale[None, :])
            new[a + "out_bias"] = g(P + "attention.output.dense.bias")[K] * gate * zK
            new[a + "ln_weight"] = g(P + "attention.output.LayerNorm.weight")[K] * zK
            new[a + "ln_bias"] = g(P + "attention.output.LayerNorm.bias")[K] * zK
        # ---- FFN
        gate = z["ffn"][i]
        units = torch.nonzero(z["intermediate"][i] != 0).flatten() if gate != 0 else torch.zeros(0, dtype=torch.long)
        ffn_present.append(bool(gate != 0))
        widths.append(int(units.numel()))
        if gate != 0:
            f = o + "ffn."
            if units.numel():
                new[f + "w1"] = g(P + "intermediate.dense.weight")[units][:, K]
                new[f + "b1"] = g(P + "intermediate.dense.bias")[units]
                new[f + "w2"] = (g(P + "output.dense.weight")[K][:, units]
                                 * (gate * zK)[:, None] * z["intermediate"][i][units][None, :])
            new[f + "b2"] = g(P + "output.dense.bias")[K] * gate * zK
            new[f + "ln_weight"] = g(P + "output.LayerNorm.weight")[K] * zK
            new[f + "ln_bias"] = g(P + "output.LayerNorm.bias")[K] * zK

    # ---- task head and distillation projection: inputs lose the pruned columns only
    if "qa_outputs.weight" in sd:
        task, num_labels, csize = "question_answering", 2, None
        new["qa_outputs.weight"] = g("qa_outputs.weight")[:, K]
        new["qa_outputs.bias"] = g("qa_outputs.bias")
    elif model_type == "bert" and "classifier.weight" in sd:
        task = "sequence_classification"
        if pre + "pooler.dense.weight" not in sd:
            raise ValueError("cofi.pruning: BERT classifier needs bert.pooler.dense.* in the state dict")
        new["pooler.weight"] = g(pre + "pooler.dense.weight")[:, K]
        new["pooler.bias"] = g(pre + "pooler.dense.bias")
        new["classifier.weight"] = g("classifier.weight")
        new["classifier.bias"] = g("classifier.bias")
        num_labels, csize = new["classifier.weight"].shape[0], new["pooler.weight"].shape[0]
    elif model_type == "roberta" and "classifier.dense.weight" in sd:
        task = "sequence_classification"
        new["classifier_dense.weight"] = g("classifier.dense.weight")[:, K]
        new["classifier_dense.bias"] = g("classifier.dense.bias")
        new["classifier.weight"] = g("classifier.out_proj.weight")
        new["classifier.bias"] = g("classifier.out_proj.bias")
        num_labels, csize = new["classifier.weight"].shape[0], new["classifier_dense.weight"].shape[0]
    else:
        raise ValueError("cofi.pruning: no task head found (expected qa_outputs.*, classifier.* "
                         "(BERT) or classifier.dense/out_proj.* (RoBERTa))")
    proj = None
    if "layer_transformation.weight" in sd:
        new["layer_transformation.weight"] = g("layer_transformation.weight")[:, K]
        new["layer_transformation.bias"] = g("layer_transformation.bias")
        proj = new["layer_transformation.weight"].shape[0]

    id2label = {str(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
    if len(id2label) != num_labels:
        id2label = {str(i): f"LABEL_{i}" for i in range(num_labels)} if task != "question_answering" else {}
    cfg = CompactConfig(
        model_type=model_type, task=task, vocab_size=hf_config.vocab_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size, pad_token_id=int(hf_config.pad_token_id or 0),
        hidden_size=int(K.numel()), original_hidden_size=d, hidden_index=[int(k) for k in K],
        head_dim=D, num_heads=num_heads, attention_present=attn_present,
        intermediate_sizes=widths, ffn_present=ffn_present, original_num_heads=H,
        original_intermediate_size=Fi, hidden_act=hf_config.hidden_act,
        layer_norm_eps=float(hf_config.layer_norm_eps), num_labels=int(num_labels),
        id2label=id2label, label2id={v: int(k) for k, v in id2label.items()},
        problem_type=getattr(hf_config, "problem_type", None), classifier_size=csize,
        distill_proj_size=proj, kept_heads=kept_heads, task_spec=getattr(hf_config, "cofi_task", None),
        base_model=getattr(hf_config, "cofi_base_model", None))
    return cfg, {k: v.to(out_dtype).contiguous() for k, v in new.items()}


def prune(model: torch.nn.Module, masks: Any, *, layer_transformation: torch.nn.Module | None = None,
          dtype: torch.dtype | None = None) -> CompactModel:
    """Compact model equal to ``model``'s dense-masked forward with deterministic ``masks``
    (soft or binary values). ``model``: a cofi.models or transformers BERT/RoBERTa for sequence
    classification / QA (HF parameter names; ``model.config`` the HF config).
    ``layer_transformation``: optional distillation projection (nn.Linear on hidden states) to prune
    along (also picked up from ``model.layer_transformation`` if the model owns one)."""
    sd = dict(model.state_dict())
    proj = layer_transformation if layer_transformation is not None else getattr(model, "layer_transformation", None)
    if proj is not None and "layer_transformation.weight" not in sd:
        sd["layer_transformation.weight"] = proj.weight
        sd["layer_transformation.bias"] = proj.bias
    p = next(model.parameters())
    cfg, new = prune_state_dict(sd, model.config, masks, dtype=dtype or p.dtype)
    compact = CompactModel(cfg).to(new["embeddings.ln_weight"].dtype)
    compact.load_state_dict(new, strict=True)
    return compact.to(p.device).eval()
