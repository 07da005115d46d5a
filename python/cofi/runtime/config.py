"""CompactConfig: the per-layer structure of a pruned (ragged) BERT/RoBERTa, stored as config.json."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, read_json_object
from ..vocab import HF_ACTIVATIONS, attention_params, ffn_params, layer_params

TASKS = ("sequence_classification", "question_answering")
MODEL_TYPES = ("bert", "roberta")
CONFIG_NAME = "config.json"
HF_MODEL_TYPE = "cofi_compact"  # config.json's model_type for transformers (the architecture: base_model_type)
WEIGHTS_NAME = "model.safetensors"


class ModelFolderError(UserError):
    """A compact model folder is missing, unreadable or inconsistent (config.json, model.safetensors).

    ``detail``: the problem without the location (callers that know the file add it)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


def _int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _bool(v: object) -> bool:
    return isinstance(v, bool)


def read_folder_config(d: Path, hint: str) -> dict[str, Any]:
    """The JSON object in model folder ``d``'s config.json; a missing, empty or unreadable folder
    or file is one :class:`ModelFolderError` ending in ``hint`` (what to give instead)."""
    if not d.exists():
        raise ModelFolderError(f"cofi.runtime: model folder {d} not found; {hint}")
    if not d.is_dir():
        raise ModelFolderError(f"cofi.runtime: {d} is a file, not a model folder; {hint}")
    f = d / CONFIG_NAME
    if not f.is_file():
        what = "is empty" if not any(d.iterdir()) else f"has no {CONFIG_NAME}"
        raise ModelFolderError(f"cofi.runtime: model folder {d} {what}; {hint}")
    return read_json_object(f, ModelFolderError, "cofi.runtime")


def is_compact_config(obj: dict[str, Any]) -> bool:
    """Whether a config.json object is a compact model's (not a transformers model's)."""
    return "num_heads" in obj or "cofi_format" in obj


@dataclass
class CompactConfig:
    """Structure of a compact model.

    Per layer i: ``num_heads[i]`` heads of ``head_dim`` (0 allowed), ``intermediate_sizes[i]`` FFN
    units (0 allowed). ``attention_present[i]`` / ``ffn_present[i]`` say whether the sublayer exists at
    all; a sublayer that is present with width 0 is "bias only" (LayerNorm(residual + bias)): that is
    what the masked model computes when a layer gate is alive but every unit of it is dead (issue 36).
    ``hidden_size`` is the reduced residual width; ``hidden_index`` lists which of the original
    ``original_hidden_size`` dims were kept (hidden states of this model are those columns of the
    masked model's hidden states). ``zero_ffn_units[i]`` counts all-zero FFN units appended by width
    padding (excluded from parameter counts). ``zero_hidden_dims`` counts all-zero residual dims
    appended at the end by hidden padding: ``hidden_size`` includes them, ``hidden_index`` does not,
    and every LayerNorm leaves them out of its statistics (so padding is exact).

    config.json is also a transformers config (``cofi.runtime.hf_export``): ``model_type`` is
    ``cofi_compact`` there, with this ``model_type`` as ``base_model_type``, and ``auto_map`` names
    the self-contained modeling file saved beside it.
    """

    model_type: str
    task: str
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    hidden_size: int
    original_hidden_size: int
    hidden_index: list[int]
    head_dim: int
    num_heads: list[int]
    attention_present: list[bool]
    intermediate_sizes: list[int]
    ffn_present: list[bool]
    original_num_heads: int
    original_intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    id2label: dict[str, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    problem_type: str | None = None
    classifier_size: int | None = None  # width of BERT pooler / RoBERTa classifier.dense output
    distill_proj_size: int | None = None  # output width of the layer_transformation, if kept
    zero_ffn_units: list[int] = field(default_factory=list)
    kept_heads: list[list[int]] = field(default_factory=list)  # original head indices, per layer
    zero_hidden_dims: int = 0
    task_spec: dict[str, Any] | None = None  # the training task (cofi.data.task_record), if known
    base_model: str | None = None  # the pre-trained model the pruned one descends from, if known
    cofi_format: int = 1

    def __post_init__(self) -> None:
        if not self.zero_ffn_units and isinstance(self.num_heads, list):
            self.zero_ffn_units = [0] * len(self.num_heads)
        problem = self.problem()
        if problem:
            raise ModelFolderError(f"cofi.runtime: compact config: {problem}", detail=problem)

    def problem(self) -> str | None:
        """The first thing wrong with this config (types, ranges, per-layer consistency), or None."""
        for name in ("model_type", "task", "hidden_act"):
            if not isinstance(getattr(self, name), str):
                return f"{name} must be a string, got {getattr(self, name)!r}"
        if self.model_type not in MODEL_TYPES:
            return f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}"
        if self.task not in TASKS:
            return f"task must be one of {', '.join(TASKS)}, got {self.task!r}"
        if self.hidden_act not in HF_ACTIVATIONS:
            return f"hidden_act must be one of {', '.join(sorted(HF_ACTIVATIONS))}, got {self.hidden_act!r}"
        for name in ("vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_size",
                     "original_hidden_size", "head_dim", "original_num_heads", "original_intermediate_size",
                     "num_labels", "cofi_format"):
            if not _int(getattr(self, name)) or getattr(self, name) < 1:
                return f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
        if self.cofi_format != 1:
            return f"cofi_format {self.cofi_format} is not known to this cofi (1); update cofi"
        for name in ("pad_token_id", "zero_hidden_dims"):
            if not _int(getattr(self, name)) or getattr(self, name) < 0:
                return f"{name} must be an integer >= 0, got {getattr(self, name)!r}"
        if self.pad_token_id >= self.vocab_size:
            return f"pad_token_id must be < vocab_size={self.vocab_size}, got {self.pad_token_id}"
        if self.model_type == "roberta" and self.max_position_embeddings <= self.pad_token_id + 1:
            return (f"max_position_embeddings must exceed pad_token_id + 1={self.pad_token_id + 1} (RoBERTa "
                    f"positions start after the padding index), got {self.max_position_embeddings}")
        for name in ("classifier_size", "distill_proj_size"):
            v = getattr(self, name)
            if v is not None and (not _int(v) or v < 1):
                return f"{name} must be an integer >= 1 or null, got {v!r}"
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
            return f"layer_norm_eps must be a positive number, got {eps!r}"
        if self.problem_type is not None and not isinstance(self.problem_type, str):
            return f"problem_type must be a string or null, got {self.problem_type!r}"
        if self.task_spec is not None and not isinstance(self.task_spec, dict):
            return f"task_spec must be a JSON object or null, got {self.task_spec!r}"
        if self.base_model is not None and not isinstance(self.base_model, str):
            return f"base_model must be a string or null, got {self.base_model!r}"
        if not isinstance(self.id2label, dict) or not isinstance(self.label2id, dict):
            return "id2label and label2id must be JSON objects"
        # per-layer lists
        lists = {"num_heads": _int, "attention_present": _bool, "intermediate_sizes": _int, "ffn_present": _bool,
                 "zero_ffn_units": _int}
        for name, ok in lists.items():
            v = getattr(self, name)
            kind = "integers" if ok is _int else "true/false values"
            if not isinstance(v, list) or not all(ok(x) for x in v):
                return f"{name} must be a list of {kind} (one per layer), got {v!r}"
        L = len(self.num_heads)
        if L < 1:
            return "num_heads must list at least one layer"
        for name in lists:
            if len(getattr(self, name)) != L:
                return (f"{name} must have {L} entries (one per layer, as num_heads), "
                        f"got {len(getattr(self, name))}")
        for i in range(L):
            h, w, z = self.num_heads[i], self.intermediate_sizes[i], self.zero_ffn_units[i]
            if not 0 <= h <= self.original_num_heads:
                return f"num_heads[{i}] must be in [0, original_num_heads={self.original_num_heads}], got {h}"
            if not 0 <= z <= w:
                return f"zero_ffn_units[{i}] must be in [0, intermediate_sizes[{i}]={w}], got {z}"
            if w < 0 or w - z > self.original_intermediate_size:
                return (f"intermediate_sizes[{i}] - zero_ffn_units[{i}] must be in [0, original_intermediate_size="
                        f"{self.original_intermediate_size}], got {w - z}")
        if self.zero_hidden_dims >= self.hidden_size:
            return f"zero_hidden_dims must be < hidden_size={self.hidden_size}, got {self.zero_hidden_dims}"
        real = self.real_hidden_size
        if real > self.original_hidden_size:
            return (f"hidden_size - zero_hidden_dims={real} must be <= original_hidden_size="
                    f"{self.original_hidden_size}")
        idx = self.hidden_index
        if not isinstance(idx, list) or not all(_int(x) and 0 <= x < self.original_hidden_size for x in idx):
            return f"hidden_index must list kept dims in [0, original_hidden_size={self.original_hidden_size})"
        if len(idx) != real:
            return f"hidden_index must have hidden_size - zero_hidden_dims={real} entries, got {len(idx)}"
        if len(set(idx)) != len(idx):
            return "hidden_index lists a dim twice"
        kh = self.kept_heads
        if not isinstance(kh, list) or kh and len(kh) != L:
            return f"kept_heads must be empty or have {L} entries (one per layer)"
        for i, heads in enumerate(kh):
            if not isinstance(heads, list) or len(heads) != self.num_heads[i] or len(set(heads)) != len(heads) \
                    or not all(_int(x) and 0 <= x < self.original_num_heads for x in heads):
                return (f"kept_heads[{i}] must list num_heads[{i}]={self.num_heads[i]} distinct heads in "
                        f"[0, original_num_heads={self.original_num_heads})")
        return None

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    @property
    def real_hidden_size(self) -> int:
        """Kept residual dims (``hidden_size`` without the zero padding dims)."""
        return self.hidden_size - self.zero_hidden_dims

    def encoder_params(self) -> int:
        """Kept encoder parameters counted the paper's way (docs/cofi-reference.md 4.5): every layer's
        weights, biases and LayerNorms over the real hidden dims and real FFN units; no embeddings,
        pooler, classifier or distillation projection; zero padding (dims or units) not counted."""
        d, n = self.real_hidden_size, 0
        for i in range(self.num_layers):
            if self.attention_present[i]:
                n += attention_params(d, self.num_heads[i], self.head_dim, layer_norm=True)
            if self.ffn_present[i]:
                n += ffn_params(d, self.intermediate_sizes[i] - self.zero_ffn_units[i], layer_norm=True)
        return n

    def to_dict(self) -> dict[str, Any]:
        """config.json's object: these fields plus the transformers keys (``hf_export.hf_keys``)."""
        from .hf_export import hf_keys

        d = dataclasses.asdict(self)
        for k in ("id2label", "label2id"):  # transformers reads {} as zero labels, null as "from num_labels"
            d[k] = d[k] or None
        d.update(hf_keys(self.model_type, self.task))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompactConfig":
        """From a config.json object; unknown keys are ignored, missing required keys refused."""
        d = dict(d)
        if d.get("model_type") == HF_MODEL_TYPE:
            d["model_type"] = d.get("base_model_type")
        for k in ("id2label", "label2id"):
            if k in d and d[k] is None:
                d[k] = {}
        fs = dataclasses.fields(cls)
        need = [f.name for f in fs if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in need if n not in d]
        if missing:
            detail = f"lacks key(s) {', '.join(missing)}"
            raise ModelFolderError(f"cofi.runtime: compact config {detail}", detail=detail)
        names = {f.name for f in fs}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: str) -> None:
        """config.json, the transformers modeling file it names and a model card (README.md)."""
        from .hf_export import write_model_card, write_remote_code

        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        write_remote_code(directory)
        write_model_card(directory, self)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CompactConfig":
        """Read and check ``directory/config.json``; every problem is one :class:`ModelFolderError`
        naming the folder (or file) and what is wrong."""
        d = Path(directory)
        hint = "give a folder written by CompactModel.save_pretrained (cofi prune writes <output_dir>/compact)"
        obj = read_folder_config(d, hint)
        f = d / CONFIG_NAME
        if not is_compact_config(obj):
            if (d / "masks.safetensors").exists():
                raise ModelFolderError(f"cofi.runtime: {d} is a pruning checkpoint (full model + masks), not a "
                                       f"compact model folder; use the run's compact/ folder")
            raise ModelFolderError(f"cofi.runtime: {d} is not a compact model folder (its {CONFIG_NAME} has no "
                                   f"num_heads; model_type {obj.get('model_type')!r}); {hint}")
        try:
            return cls.from_dict(obj)
        except ModelFolderError as e:
            raise ModelFolderError(f"cofi.runtime: {f}: {e.detail}", detail=e.detail) from None

    # ---- parameter counting the paper's way (docs/cofi-reference.md 4.5) ----
    def full_encoder_params(self) -> int:
        """Encoder parameters of the unpruned model (BERT-base: 85,054,464)."""
        d, F = self.original_hidden_size, self.original_intermediate_size
        return self.num_layers * layer_params(d, 1, d, F, layer_norm=True)  # all heads: width d
