"""CompactConfig: the per-layer structure of a pruned (ragged) BERT/RoBERTa, stored as config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

TASKS = ("sequence_classification", "question_answering")
MODEL_TYPES = ("bert", "roberta")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
    cofi_format: int = 1

    def __post_init__(self) -> None:
        L = len(self.num_heads)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"cofi.runtime: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.task not in TASKS:
            raise ValueError(f"cofi.runtime: task must be one of {TASKS}, got {self.task!r}")
        for name in ("attention_present", "intermediate_sizes", "ffn_present"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"cofi.runtime: {name} must have {L} entries (one per layer), "
                                 f"got {len(getattr(self, name))}")
        if not self.zero_ffn_units:
            self.zero_ffn_units = [0] * L
        if self.hidden_size < 1:
            raise ValueError("cofi.runtime: hidden_size must be >= 1 (every hidden dim was pruned)")
        if not 0 <= self.zero_hidden_dims < self.hidden_size:
            raise ValueError(f"cofi.runtime: zero_hidden_dims must be in [0, hidden_size={self.hidden_size}), "
                             f"got {self.zero_hidden_dims}")
        if len(self.hidden_index) != self.real_hidden_size:
            raise ValueError(f"cofi.runtime: hidden_index must have hidden_size - zero_hidden_dims="
                             f"{self.real_hidden_size} entries, got {len(self.hidden_index)}")

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    @property
    def real_hidden_size(self) -> int:
        """Kept residual dims (``hidden_size`` without the zero padding dims)."""
        return self.hidden_size - self.zero_hidden_dims

    def encoder_params(self) -> int:
        """Kept encoder parameters counted the paper's way (cofi-reference.md 4.5): every layer's
        weights, biases and LayerNorms over the real hidden dims and real FFN units; no embeddings,
        pooler, classifier or distillation projection; zero padding (dims or units) not counted."""
        d, n = self.real_hidden_size, 0
        for i in range(self.num_layers):
            if self.attention_present[i]:
                w = self.num_heads[i] * self.head_dim
                n += 4 * w * d + 3 * w + d + 2 * d
            if self.ffn_present[i]:
                f = self.intermediate_sizes[i] - self.zero_ffn_units[i]
                n += 2 * f * d + f + d + 2 * d
        return n

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["architecture"] = "CompactModel"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompactConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "CompactConfig":
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return cls.from_dict(json.load(f))

    # ---- parameter counting the paper's way (cofi-reference.md 4.5) ----
    def full_encoder_params(self) -> int:
        """Encoder parameters of the unpruned model (BERT-base: 85,054,464)."""
        d, F = self.original_hidden_size, self.original_intermediate_size
        per_layer = 4 * d * d + 4 * d + 2 * d * F + F + d + 4 * d
        return self.num_layers * per_layer
