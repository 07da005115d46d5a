"""A CoFi compact (structurally pruned) BERT/RoBERTa for plain transformers.

This file is copied next to the weights of every compact model folder cofi writes, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

(or ``AutoModelForQuestionAnswering`` for QA folders) loads the model with torch and transformers
only: it must not import cofi. Per layer i the model has ``num_heads[i]`` attention heads of
``head_dim`` and ``intermediate_sizes[i]`` FFN units (0 allowed: the sublayer adds its bias only);
``attention_present[i]`` / ``ffn_present[i]`` say whether a sublayer exists at all. The residual
width is ``hidden_size``; its last ``zero_hidden_dims`` dims are exact zero padding that every
LayerNorm leaves out. Weight names are those of ``cofi.runtime.CompactModel`` (fused QKV per layer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_tanh": "gelu_tanh", "relu": "relu"}


class CofiCompactConfig(PretrainedConfig):
    """The compact structure (config.json as cofi writes it; ``base_model_type``: bert | roberta).
    No ``__init__`` of its own: every key of config.json becomes an attribute."""

    model_type = "cofi_compact"


def _activation(h: torch.Tensor, name: str) -> torch.Tensor:
    kind = ACTIVATIONS[name]
    if kind == "relu":
        return torch.relu(h)
    return F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


class _Norm(nn.Module):
    """LayerNorm(x + residual) over the first ``real`` dims; the zero padding dims after them stay 0."""

    def __init__(self, d: int, real: int, eps: float) -> None:
        super().__init__()
        self.real, self.eps = real, eps
        self.ln_weight = nn.Parameter(torch.ones(d))
        self.ln_bias = nn.Parameter(torch.zeros(d))

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        r, d = self.real, v.shape[-1]
        y = F.layer_norm(v[..., :r], (r,), self.ln_weight[:r], self.ln_bias[:r], self.eps)
        return y if r == d else torch.cat([y, v.new_zeros(*v.shape[:-1], d - r)], -1)


class CofiCompactAttention(_Norm):
    def __init__(self, config: CofiCompactConfig, i: int) -> None:
        d = config.hidden_size
        super().__init__(d, d - config.zero_hidden_dims, config.layer_norm_eps)
        self.num_heads, self.head_dim = config.num_heads[i], config.head_dim
        w = self.num_heads * self.head_dim
        if self.num_heads > 0:
            self.qkv_weight = nn.Parameter(torch.zeros(3 * w, d))  # rows: [Q heads | K heads | V heads]
            self.qkv_bias = nn.Parameter(torch.zeros(3 * w))
            self.out_weight = nn.Parameter(torch.zeros(d, w))
        self.out_bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, d]; keep [B, S] bool (True = real token) or None."""
        if self.num_heads == 0:
            return self.norm(x + self.out_bias)
        B, S, _ = x.shape
        h, D = self.num_heads, self.head_dim
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).view(B, S, 3, h, D).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
        if keep is not None:
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
            # a row with no real key attends to nothing (softmax over all -inf gives NaN there)
            probs = torch.softmax(scores, -1).masked_fill(~keep.any(-1)[:, None, None, None], 0.0)
        else:
            probs = torch.softmax(scores, -1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(B, S, h * D)
        return self.norm(F.linear(ctx, self.out_weight, self.out_bias) + x)


class CofiCompactFFN(_Norm):
    def __init__(self, config: CofiCompactConfig, i: int) -> None:
        d = config.hidden_size
        super().__init__(d, d - config.zero_hidden_dims, config.layer_norm_eps)
        self.width, self.act = config.intermediate_sizes[i], config.hidden_act
        if self.width > 0:
            self.w1 = nn.Parameter(torch.zeros(self.width, d))
            self.b1 = nn.Parameter(torch.zeros(self.width))
            self.w2 = nn.Parameter(torch.zeros(d, self.width))
        self.b2 = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return self.norm(x + self.b2)
        return self.norm(F.linear(_activation(F.linear(x, self.w1, self.b1), self.act), self.w2, self.b2) + x)


class CofiCompactLayer(nn.Module):
    def __init__(self, config: CofiCompactConfig, i: int) -> None:
        super().__init__()
        self.attention = CofiCompactAttention(config, i) if config.attention_present[i] else None
        self.ffn = CofiCompactFFN(config, i) if config.ffn_present[i] else None

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if self.attention is not None:
            x = self.attention(x, keep)
        if self.ffn is not None:
            x = self.ffn(x)
        return x


class CofiCompactEmbeddings(_Norm):
    def __init__(self, config: CofiCompactConfig) -> None:
        d = config.hidden_size
        super().__init__(d, d - config.zero_hidden_dims, config.layer_norm_eps)
        self.roberta, self.pad = config.base_model_type == "roberta", config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.roberta:  # positions count real tokens and start after the padding index
            real = input_ids.ne(self.pad).to(torch.long)
            pos = torch.cumsum(real, dim=1) * real + self.pad
        else:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.norm(e + self.position_embeddings(pos))


class CofiCompactPreTrainedModel(PreTrainedModel):
    config_class = CofiCompactConfig
    base_model_prefix = ""
    _no_split_modules = ["CofiCompactLayer"]

    def __init__(self, config: CofiCompactConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embeddings = CofiCompactEmbeddings(config)
        self.layers = nn.ModuleList(CofiCompactLayer(config, i) for i in range(len(config.num_heads)))
        proj = getattr(config, "distill_proj_size", None)
        self.layer_transformation = nn.Linear(d, proj) if proj else None  # distillation only; unused here

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the folder's model.safetensors

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Hidden states [B, S, hidden_size]: the embedding output, then each layer's output."""
        keep = None if attention_mask is None else attention_mask.to(torch.bool)
        hs = [self.embeddings(input_ids, token_type_ids)]
        for layer in self.layers:
            hs.append(layer(hs[-1], keep))
        return tuple(hs)

    def _real(self, hs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        r = self.config.hidden_size - self.config.zero_hidden_dims
        return tuple(h[..., :r] for h in hs)


class CofiCompactForSequenceClassification(CofiCompactPreTrainedModel):
    """logits [B, num_labels] from the CLS position (BERT: pooler + classifier; RoBERTa:
    classifier_dense + tanh + classifier)."""

    def __init__(self, config: CofiCompactConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        c = getattr(config, "classifier_size", None) or config.original_hidden_size
        if config.base_model_type == "bert":
            self.pooler = nn.Linear(d, c)
        else:
            self.classifier_dense = nn.Linear(d, c)
        self.classifier = nn.Linear(c, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True, **kwargs):
        hs = self.encode(input_ids, attention_mask, token_type_ids)
        cls = hs[-1][:, 0]
        dense = self.pooler if self.config.base_model_type == "bert" else self.classifier_dense
        logits = self.classifier(torch.tanh(dense(cls)))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=self._real(hs) if output_hidden_states else None)


class CofiCompactForQuestionAnswering(CofiCompactPreTrainedModel):
    """start_logits / end_logits [B, S]."""

    def __init__(self, config: CofiCompactConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, output_hidden_states: bool = False,
                return_dict: bool = True, **kwargs):
        hs = self.encode(input_ids, attention_mask, token_type_ids)
        se = self.qa_outputs(hs[-1])
        start, end = se[..., 0].contiguous(), se[..., 1].contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = 0.5 * (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions))
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                            hidden_states=self._real(hs) if output_hidden_states else None)
