"""One home for the tests' tiny random Llama folders: a word-level tokenizer over ``WORDS`` (plus
``<unk>`` and ``</s>``) and a seeded random ``LlamaForCausalLM`` with a tied head, both saved with
``save_pretrained`` so every loader reads them as it reads a real checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(30)]


def save_tiny_llama(d: Path, *, hidden: int, heads: int, kv_heads: int, intermediate: int, max_positions: int,
                    head_dim: int = 8, layers: int = 2, seed: int = 0) -> None:
    """Writes the tokenizer and a random model (``torch.manual_seed(seed)`` first) into folder ``d``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>").save_pretrained(str(d))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                      tie_word_embeddings=True, max_position_embeddings=max_positions)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
