"""Save a compact (pruned) decoder as a folder plain transformers loads.

- uniform structure (``CompactLlamaConfig.stock_config()``: every kept layer keeps both sublayers
  with the same query / K/V head counts, equal query heads per group and the same FFN width; a layer
  with both sublayers removed is an identity and left out, the others renumbered): a stock
  ``LlamaForCausalLM`` (or Qwen2 / Mistral) folder: config.json + model.safetensors +
  generation_config.json + README.md (+ the source model's tokenizer files). No cofi, no remote
  code. A pruned hidden size is exact: the fold put the hidden mask into the RMSNorm weights.
- otherwise: cofi's compact format (cofi_llama.json + model.safetensors, so cofi loads it too) plus
  config.json with ``auto_map`` and the self-contained ``modeling_cofi_llama.py``, so
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import UserError
from .compact_llama import CompactLlamaForCausalLM

MODELING_FILE = "modeling_cofi_llama.py"
REMOTE_MODEL_TYPE = "cofi_llama_compact"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def is_stock(model: CompactLlamaForCausalLM) -> bool:
    """True when the structure fits the base model's stock transformers class."""
    try:
        model.config.stock_config()
    except UserError:
        return False
    return True


def _new_folder(folder: str | Path) -> Path:
    out = Path(folder)
    if out.exists():
        raise UserError(f"cofi.runtime.llama_export: folder must not exist yet (never overwritten), got {out}")
    return out


def _copy_source(out: Path, source: str | Path | None) -> list[str]:
    """Tokenizer files (and generation_config.json) of the source model folder; names copied."""
    if source is None:
        return []
    src = Path(source)
    if not src.is_dir():
        raise UserError(f"cofi.runtime.llama_export: source must be the base model's folder, got {src}")
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _generation_config(out: Path, model: CompactLlamaForCausalLM) -> None:
    if (out / "generation_config.json").exists():
        return
    b = model.config.base
    keys = {k: b[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if b.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(keys, indent=2))


def model_card(model: CompactLlamaForCausalLM, stock: bool, base_model: str | None = None,
               notes: list[str] | None = None) -> str:
    """README.md: base model, structure, parameter counts against the base, how to load."""
    from ..masks.decoder import DecoderShape, full_size

    c = model.config
    n = c.num_parameters()
    full = full_size(DecoderShape.from_hf_config(c.hf_config()))
    mt = c.base["model_type"]
    heads = [len(h) if a else 0 for h, a in zip(c.q_heads, c.attention)]
    kv = [len(h) if a else 0 for h, a in zip(c.kv_heads, c.attention)]
    ffn = [f if m else 0 for f, m in zip(c.intermediate_sizes, c.mlp)]
    b = c.base
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- cofi",
             "- structured-pruning", "---", "", f"# CoFi-pruned {mt} causal LM", "",
             f"- base model: `{base_model or 'not recorded'}`",
             (f"- parameters: body {n['body']:,} of {full['body']:,} (sparsity {1 - n['body'] / full['body']:.4f}); "
              f"embedding {n['embedding']:,}; LM head {n['lm_head']:,}{' (tied)' if c.tie_word_embeddings else ''}; "
              f"total {n['total']:,} of {full['total']:,}"),
             (f"- structure: {c.num_layers} layers, hidden size {c.hidden_size} of {b['hidden_size']}, query heads "
              f"per layer {heads} (of {b['num_attention_heads']}), K/V heads {kv} (of "
              f"{b.get('num_key_value_heads') or b['num_attention_heads']}), FFN units {ffn} "
              f"(of {b['intermediate_size']}), head dim {c.head_dim}")]
    if stock and len(c.stock_layers()) < c.num_layers:
        gone = [i for i in range(c.num_layers) if i not in c.stock_layers()]
        lines.append(f"- layers {gone} keep neither sublayer (the identity) and are left out: the checkpoint has "
                     f"{len(c.stock_layers())} layers, the others in order")
    lines += [f"- {x}" for x in notes or []]
    if stock:
        lines += ["", "## Use", "", "A stock transformers checkpoint (no cofi, no remote code):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(folder)", "```", ""]
    else:
        lines += ["", "## Use", "", (f"Layers differ in shape, so stock transformers classes cannot hold it; the "
                                     f"folder carries `{MODELING_FILE}` (torch + transformers only):"), "", "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)", "```", "",
                  "Its forward has no KV cache; `cofi generate FOLDER --prompt ...` generates with cofi's runtime.", ""]
    return "\n".join(lines)


def export_llama(model: CompactLlamaForCausalLM, folder: str | Path, source: str | Path | None = None,
                 mode: str = "auto", base_model: str | None = None, notes: list[str] | None = None) -> Path:
    """Write ``folder`` (new). ``mode``: stock | remote | auto (stock when the structure allows it).
    ``source``: the base model's folder, whose tokenizer files and generation config are copied."""
    if mode not in ("auto", "stock", "remote"):
        raise UserError(f"cofi.runtime.llama_export: mode must be auto, stock or remote, got {mode!r}")
    out = _new_folder(folder)
    stock = mode == "stock" or (mode == "auto" and is_stock(model))
    if stock:
        cfg = model.config.stock_config()  # raises the one-line reason when not uniform
        cfg.architectures = [_ARCH[model.config.base["model_type"]]]
        cfg.dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
        from safetensors.torch import save_file

        out.mkdir(parents=True)
        cfg.save_pretrained(out)
        save_file(model.stock_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(out)
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out / MODELING_FILE)
        (out / "config.json").write_text(json.dumps(remote_config(model), indent=1))
    _copy_source(out, source)
    _generation_config(out, model)
    (out / "README.md").write_text(model_card(model, stock, base_model=base_model, notes=notes))
    return out


def remote_config(model: CompactLlamaForCausalLM) -> dict[str, Any]:
    """config.json of a non-uniform folder: the compact structure, the keys transformers reads, auto_map."""
    c = model.config
    module = MODELING_FILE.removesuffix(".py")
    b = c.base
    return {**c.to_dict(), "model_type": REMOTE_MODEL_TYPE, "architectures": ["CofiLlamaCompactForCausalLM"],
            "auto_map": {"AutoConfig": f"{module}.CofiLlamaCompactConfig",
                         "AutoModelForCausalLM": f"{module}.CofiLlamaCompactForCausalLM"},
            "vocab_size": b["vocab_size"], "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
            "tie_word_embeddings": c.tie_word_embeddings, "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
            **{k: b[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if b.get(k) is not None}}


__all__ = ["export_llama", "is_stock", "model_card", "remote_config"]
