"""Open a model folder for evaluation: a compact folder (``CompactModel``) or a fine-tuned
transformers BERT/RoBERTa sequence-classification folder (``cofi finetune``'s teacher). Anything
else (a pruning checkpoint, a pre-trained encoder without a task head, another architecture) is
refused with one line saying what to give instead."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..vocab import layer_params
from .config import ModelFolderError, is_compact_config, read_folder_config

HINT = ("give a compact model folder (cofi prune writes <output_dir>/compact) or a fine-tuned model folder "
        "(cofi finetune writes <output_dir>/best)")


@dataclass
class EvalModel:
    """A loaded model and what evaluation needs to know about it.

    ``kind``: "compact" | "full"; ``positions``: the longest input the position table allows;
    ``task_record``: the training task it remembers (``cofi.data.task_record``) or None;
    ``structure``: encoder parameters (paper count), sparsity, hidden size, heads and FFN widths."""

    model: torch.nn.Module
    kind: str
    path: Path
    num_labels: int
    vocab_size: int
    positions: int
    task_record: dict[str, Any] | None
    structure: dict[str, Any] = field(default_factory=dict)


def _positions(max_pos: int, pad_id: int, model_type: str) -> int:
    # RoBERTa positions start after padding_idx
    return max_pos - (pad_id + 1 if model_type == "roberta" else 0)


def open_model_folder(path: str | Path, pad: int | None = None, who: str = "cofi eval") -> EvalModel:
    """Load ``path`` (compact or full sequence-classification folder); ``pad``: zero-pad a compact
    model's widths to a multiple (refused for a full model: it has nothing to pad exactly)."""
    d = Path(path)
    obj = read_folder_config(d, HINT)
    if is_compact_config(obj):
        return _compact(d, pad)
    if (d / "masks.safetensors").exists():
        raise ModelFolderError(f"{who}: {d} is a pruning checkpoint (full model + masks), not a model to evaluate; "
                               "use the run's compact/ folder")
    mt, arch = obj.get("model_type"), obj.get("architectures") or []
    if mt not in ("bert", "roberta"):
        raise ModelFolderError(f"{who}: {d} is neither a compact model folder nor a BERT/RoBERTa model folder "
                               f"(config.json model_type {mt!r}); {HINT}")
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in arch):
        what = "question answering" if any("QuestionAnswering" in str(a) for a in arch) else "no task head"
        raise ModelFolderError(f"{who}: {d} is a {mt} model with {what} (architectures {arch}), not a sequence "
                               "classifier: a pre-trained encoder must be fine-tuned first (cofi finetune)")
    if pad is not None:
        raise ModelFolderError(f"{who}: --pad {pad}: {d} is a full (unpruned) model; --pad applies to compact "
                               "model folders")
    return _full(d, obj, who)


def _compact(d: Path, pad: int | None) -> EvalModel:
    from .modeling import CompactModel

    m = CompactModel.from_pretrained(d, pad=pad)
    c = m.config
    if c.task != "sequence_classification":
        raise ModelFolderError(f"cofi eval: {d} is a {c.task} model; cofi eval evaluates sequence "
                               "classification and regression models")
    structure = {"encoder_params": m.num_encoder_params(), "full_encoder_params": c.full_encoder_params(),
                 "sparsity": m.sparsity(), "hidden_size": c.real_hidden_size, "padded_hidden_size": c.hidden_size,
                 "num_heads": [h if a else 0 for h, a in zip(c.num_heads, c.attention_present)],
                 "intermediate_sizes": [w - z if f else 0 for w, z, f in
                                        zip(c.intermediate_sizes, c.zero_ffn_units, c.ffn_present)]}
    if c.zero_hidden_dims or any(c.zero_ffn_units):
        structure["padded_intermediate_sizes"] = list(c.intermediate_sizes)
    return EvalModel(m, "compact", d, c.num_labels, c.vocab_size,
                     _positions(c.max_position_embeddings, c.pad_token_id, c.model_type), c.task_spec, structure)


def _full(d: Path, obj: dict[str, Any], who: str) -> EvalModel:
    from ..training.modeling import load_model

    id2label = obj.get("id2label")
    n = len(id2label) if isinstance(id2label, dict) and id2label else obj.get("num_labels", 2)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelFolderError(f"{who}: {d}/config.json: num_labels must be an integer >= 1, got {n!r}")
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar would sit between the command and its result or error
    try:
        m = load_model(str(d), qa=False, num_labels=n).eval()
    finally:
        if was:
            hf_logging.enable_progress_bar()
    c = m.config
    L, H, hd, F = c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.intermediate_size
    full = L * layer_params(hd, 1, hd, F, layer_norm=True)  # all heads: width hd
    structure = {"encoder_params": full, "full_encoder_params": full, "sparsity": 0.0, "hidden_size": hd,
                 "padded_hidden_size": hd, "num_heads": [H] * L, "intermediate_sizes": [F] * L}
    rec = obj.get("cofi_task")
    return EvalModel(m, "full", d, n, c.vocab_size,
                     _positions(c.max_position_embeddings, int(c.pad_token_id or 0), c.model_type), rec, structure)
