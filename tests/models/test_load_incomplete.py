"""A checkpoint that lacks encoder weights is refused (transformers would initialise them at random
and only log it); a missing task head is still initialised, as fine-tuning from a pre-trained
encoder needs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

from cofi.errors import UserError
from cofi.models import CoFiBertForSequenceClassification

CFG = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
           max_position_embeddings=32)


def test_missing_encoder_tensor_is_refused(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**CFG, num_labels=2)).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in sd if "encoder.layer.1.attention.self.query.weight" in k)
    del sd[dropped]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 encoder weights.*query.weight"):
        CoFiBertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)


def test_missing_task_head_is_initialised(tmp_path):
    torch.manual_seed(0)
    BertModel(BertConfig(**CFG)).save_pretrained(tmp_path)
    model = CoFiBertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert model.classifier.weight.shape == (3, 16)
