"""Task models: BERT / RoBERTa for sequence classification and extractive QA, with CoFi masks.

Parameter names are exactly transformers' (``bert.*`` / ``roberta.*``, ``classifier.*``,
``qa_outputs.*``), so HF state dicts load directly and ``save_pretrained`` output loads back into
transformers' own classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..masks import MaskConfig, Masks
from .encoder import CoFiEncoder
from .plan import CompactPolicy, StepPlan


@dataclass
class CoFiOutput:
    """logits [B, num_labels] (classification) or start_logits / end_logits [B, S] (QA).

    hidden_states: (embedding output, layer 1 output, ..., layer L output), each [B, S, d'], or None.
    hidden_index: None when d' = d; in compact mode with gathered hidden dims, the int64 [d'] indices
    of the live hidden dims the states are given in (use ``full_hidden_states()`` for [B, S, d], or
    gather a projection's input columns with it, as ``cofi.training.losses.layer_distill_loss`` does).
    plan: the step's live-unit plan (``cofi.models.plan.StepPlan``).
    """

    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    hidden_index: torch.Tensor | None = None
    plan: StepPlan | None = None

    def full_hidden_states(self, hidden_size: int) -> tuple[torch.Tensor, ...] | None:
        """hidden_states scattered back to the full width d (zeros in pruned dims)."""
        if self.hidden_states is None or self.hidden_index is None:
            return self.hidden_states
        out = []
        for h in self.hidden_states:
            full = h.new_zeros(*h.shape[:-1], hidden_size)
            out.append(full.index_copy(-1, self.hidden_index, h))
        return tuple(out)


def _cols(w: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return w if idx is None else w.index_select(1, idx)


class _RobertaClassificationHead(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)


class CoFiPreTrainedModel(nn.Module):
    """Shared loading / saving / forward plumbing. Subclasses set ``base_name`` ("bert" /
    "roberta"), ``hf_class`` (transformers class name) and ``task`` ("cls" / "qa")."""

    base_name = "bert"
    hf_class = "BertForSequenceClassification"
    task = "cls"

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        roberta = self.base_name == "roberta"
        add_pool = self.task == "cls" and not roberta
        setattr(self, self.base_name, CoFiEncoder(config, roberta=roberta, add_pooling_layer=add_pool))
        if self.task == "qa":
            self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)  # HF: num_labels = 2
        elif roberta:
            self.classifier = _RobertaClassificationHead(config)
        else:
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, mod: nn.Module) -> None:  # transformers' BertPreTrainedModel init
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(mod, nn.Linear):
            mod.weight.data.normal_(0.0, std)
            mod.bias.data.zero_()
        elif isinstance(mod, nn.Embedding):
            mod.weight.data.normal_(0.0, std)
            if mod.padding_idx is not None:
                mod.weight.data[mod.padding_idx].zero_()
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.data.fill_(1.0)
            mod.bias.data.zero_()

    @property
    def encoder_model(self) -> CoFiEncoder:
        return getattr(self, self.base_name)

    def mask_config(self, **kw: object) -> MaskConfig:
        """The MaskConfig matching this model's shape (kw: groups, init_mean, ...)."""
        return MaskConfig.from_hf_config(self.config, **kw)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, masks: Masks | None = None, backend: str = "compact",
                output_hidden_states: bool = False, policy: CompactPolicy = CompactPolicy()) -> CoFiOutput:
        """input_ids, attention_mask, token_type_ids: [B, S]. masks: None = the plain model.
        backend: "compact" (live units only) or "dense" (the reference's dense-masked method)."""
        x, states, plan = self.encoder_model(input_ids, attention_mask, token_type_ids, masks, backend,
                                             output_hidden_states, policy)
        hk = plan.hidden_idx
        p = self._classifier_dropout() if self.training else 0.0
        out = CoFiOutput(hidden_states=states, hidden_index=hk, plan=plan)
        if self.task == "qa":
            lg = F.linear(x, _cols(self.qa_outputs.weight, hk), self.qa_outputs.bias)
            out.start_logits = lg[..., 0].contiguous()
            out.end_logits = lg[..., 1].contiguous()
            return out
        cls = x[:, 0]
        if self.base_name == "roberta":
            c = self.classifier
            cls = F.dropout(cls, p, self.training)
            cls = torch.tanh(F.linear(cls, _cols(c.dense.weight, hk), c.dense.bias))
            cls = F.dropout(cls, p, self.training)
            out.logits = c.out_proj(cls)
        else:
            pool = self.encoder_model.pooler.dense
            pooled = torch.tanh(F.linear(cls, _cols(pool.weight, hk), pool.bias))
            pooled = F.dropout(pooled, p, self.training)
            out.logits = self.classifier(pooled)
        return out

    def _classifier_dropout(self) -> float:
        c = getattr(self.config, "classifier_dropout", None)
        return self.config.hidden_dropout_prob if c is None else c

    # ------------------------------------------------------------------ load / save
    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, num_labels: int | None = None, **kw: object):
        """Load any transformers checkpoint of the matching family (local folder or hub name).

        The checkpoint is read through transformers' own ``<hf_class>.from_pretrained`` (handles
        safetensors / .bin, sharding, legacy names, and initialises a missing task head the HF way);
        kw are passed on (e.g. ``revision``, ``cache_dir``, config overrides). A model saved by
        ``save_pretrained`` loads the same way."""
        import transformers

        hf_cls = getattr(transformers, cls.hf_class)
        if num_labels is not None:
            kw["num_labels"] = num_labels
        hf, info = hf_cls.from_pretrained(str(path_or_name), output_loading_info=True, **kw)
        # transformers initialises any tensor the checkpoint lacks at random and only logs it; a fresh
        # task head (or pooler) is normal when fine-tuning, a missing embedding or encoder tensor is not
        body = sorted(k for k in info.get("missing_keys", ()) if ".embeddings." in f".{k}" or ".encoder." in f".{k}")
        if body:
            more = f" and {len(body) - 3} more" if len(body) > 3 else ""
            raise UserError(f"cofi.models: {path_or_name} lacks {len(body)} encoder weights "
                            f"({', '.join(body[:3])}{more}); they would be random: the checkpoint is incomplete")
        model = cls(hf.config)
        sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"cofi.models: {cls.__name__} could not take {path_or_name}'s weights: "
                               f"missing {missing}, unexpected {unexpected}")
        model.train(hf.training)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """config.json + model.safetensors, loadable by this class and by transformers."""
        from safetensors.torch import save_file

        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [self.hf_class]
        self.config.save_pretrained(str(d))
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    @staticmethod
    def load_tokenizer(path_or_name: str | os.PathLike, **kw: object):
        """transformers.AutoTokenizer for a checkpoint (local folder or hub name)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path_or_name), **kw)


class CoFiBertForSequenceClassification(CoFiPreTrainedModel):
    base_name, hf_class, task = "bert", "BertForSequenceClassification", "cls"


class CoFiBertForQuestionAnswering(CoFiPreTrainedModel):
    base_name, hf_class, task = "bert", "BertForQuestionAnswering", "qa"


class CoFiRobertaForSequenceClassification(CoFiPreTrainedModel):
    base_name, hf_class, task = "roberta", "RobertaForSequenceClassification", "cls"


class CoFiRobertaForQuestionAnswering(CoFiPreTrainedModel):
    base_name, hf_class, task = "roberta", "RobertaForQuestionAnswering", "qa"


_BY_ARCH = {c.hf_class: c for c in (CoFiBertForSequenceClassification, CoFiBertForQuestionAnswering,
                                    CoFiRobertaForSequenceClassification, CoFiRobertaForQuestionAnswering)}


def model_class_for(model_type: str, task: str) -> type[CoFiPreTrainedModel]:
    """The CoFi class for an HF ``model_type`` ("bert", "roberta") and task ("cls", "qa")."""
    base = {"bert": "Bert", "roberta": "Roberta"}.get(model_type)
    if base is None or task not in ("cls", "qa"):
        raise ValueError(f"cofi.models: unsupported model_type {model_type!r} / task {task!r} "
                         "(model_type: bert, roberta; task: cls, qa)")
    return _BY_ARCH[f"{base}For{'SequenceClassification' if task == 'cls' else 'QuestionAnswering'}"]
