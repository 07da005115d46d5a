"""Tokenisation with transformers tokenizers and dynamic-padding collation.

An :class:`Encoded` holds unpadded token id lists; ``collate(indices)`` pads a batch to its own
longest sequence (dynamic padding), so batches of similar lengths (see ``batching``) stay short.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .tasks import TaskSpec, labels_from


@dataclass
class Encoded:
    """Token ids per example (or per QA feature) plus labels; ``lengths[i]`` = len(input_ids[i])."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray | None  # [N] int64 / float32; QA train: [N, 2] start/end positions
    pad_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # QA eval: offsets, example ids, examples

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        if "_lengths" not in self.extra:
            self.extra["_lengths"] = np.fromiter((len(x) for x in self.input_ids), dtype=np.int64,
                                                 count=len(self.input_ids))
        return self.extra["_lengths"]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the selected examples to the batch's longest: input_ids/attention_mask/token_type_ids [B, S]."""
        idx = list(indices)
        s = max((len(self.input_ids[i]) for i in idx), default=1)
        b = len(idx)
        ids = torch.full((b, s), self.pad_id, dtype=torch.long)
        am = torch.zeros((b, s), dtype=torch.long)
        tt = torch.zeros((b, s), dtype=torch.long) if self.token_type_ids is not None else None
        for r, i in enumerate(idx):
            x = self.input_ids[i]
            ids[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            am[r, : len(x)] = 1
            if tt is not None:
                tt[r, : len(x)] = torch.as_tensor(self.token_type_ids[i], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": am}
        if tt is not None:
            out["token_type_ids"] = tt
        if self.labels is not None:
            out["labels"] = torch.as_tensor(self.labels[idx])
        return out

    def subset(self, n: int) -> "Encoded":
        n = min(n, len(self))
        lab = None if self.labels is None else self.labels[:n]
        tt = None if self.token_type_ids is None else self.token_type_ids[:n]
        return Encoded(self.input_ids[:n], tt, lab, self.pad_id, {})


def encode_classification(spec: TaskSpec, ds, tokenizer, max_length: int,
                          label_map: dict | None = None) -> Encoded:
    """Tokenise single sentences or pairs (truncation to ``max_length``, no padding).

    Labels as :func:`cofi.data.tasks.labels_from` reads them (exactly as written, or refused);
    ``label_map``: the training data's name -> id map when the labels are names."""
    cols = [list(map(str, ds[c])) for c in spec.text_fields]
    enc = tokenizer(*cols, truncation=True, max_length=max_length, padding=False)
    tt = enc.get("token_type_ids")
    labels, label_map = labels_from(spec, ds[spec.label_field], label_map)
    out = Encoded(list(enc["input_ids"]), list(tt) if tt is not None else None, labels,
                  tokenizer.pad_token_id or 0)
    out.extra["label_map"] = label_map
    return out


def encode_qa(ds, tokenizer, max_length: int = 384, doc_stride: int = 128, train: bool = True) -> Encoded:
    """SQuAD-style features: question + context windows (stride ``doc_stride``).

    Train: labels [N, 2] = token start/end of the answer (0, 0 = CLS when not in the window).
    Eval: ``extra`` holds per-feature example index, context offsets, and the examples.
    """
    questions = [q.lstrip() for q in ds["question"]]
    contexts = list(ds["context"])
    pad_right = tokenizer.padding_side == "right"
    enc = tokenizer(questions if pad_right else contexts, contexts if pad_right else questions,
                    truncation="only_second" if pad_right else "only_first", max_length=max_length,
                    stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                    padding=False)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets = enc["offset_mapping"]
    ctx_id = 1 if pad_right else 0
    answers = list(ds["answers"])
    if train:
        pos = np.zeros((len(enc["input_ids"]), 2), dtype=np.int64)
        for i, off in enumerate(offsets):
            seq = enc.sequence_ids(i)
            ans = answers[sample_map[i]]
            if not ans["answer_start"]:
                continue
            sc = ans["answer_start"][0]
            ec = sc + len(ans["text"][0])
            ts = next(k for k, s in enumerate(seq) if s == ctx_id)
            te = len(seq) - 1 - next(k for k, s in enumerate(reversed(seq)) if s == ctx_id)
            if not (off[ts][0] <= sc and off[te][1] >= ec):
                continue
            while ts < len(off) and off[ts][0] <= sc:
                ts += 1
            while off[te][1] >= ec:
                te -= 1
            pos[i] = (ts - 1, te + 1)
        out = Encoded(list(enc["input_ids"]), enc.get("token_type_ids"), pos, tokenizer.pad_token_id or 0)
    else:
        offs = []
        for i, off in enumerate(offsets):
            seq = enc.sequence_ids(i)
            offs.append([o if seq[k] == ctx_id else None for k, o in enumerate(off)])
        out = Encoded(list(enc["input_ids"]), enc.get("token_type_ids"), None, tokenizer.pad_token_id or 0)
        out.extra.update(example_index=list(sample_map), offsets=offs, contexts=contexts,
                         answers=[list(a["text"]) for a in answers], ids=list(ds["id"]) if "id" in ds.column_names else None)
    return out


def qa_predictions(enc: Encoded, start_logits: np.ndarray, end_logits: np.ndarray,
                   n_best: int = 20, max_answer_len: int = 30) -> list[str]:
    """Best answer text per example from per-feature start/end logits ([N_features, S] each, padded)."""
    n_ex = len(enc.extra["contexts"])
    best: list[tuple[float, str]] = [(-1e30, "")] * n_ex
    for f, ex in enumerate(enc.extra["example_index"]):
        off = enc.extra["offsets"][f]
        sl, el = start_logits[f][: len(off)], end_logits[f][: len(off)]
        s_idx = np.argsort(sl)[::-1][:n_best]
        e_idx = np.argsort(el)[::-1][:n_best]
        for s in s_idx:
            if off[s] is None:
                continue
            for e in e_idx:
                if off[e] is None or e < s or e - s + 1 > max_answer_len:
                    continue
                score = float(sl[s] + el[e])
                if score > best[ex][0]:
                    best[ex] = (score, enc.extra["contexts"][ex][off[s][0]: off[e][1]])
    return [b[1] for b in best]
