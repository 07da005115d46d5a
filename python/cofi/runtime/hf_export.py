"""What makes a compact model folder loadable by plain transformers, and its model card.

``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` (or
``AutoModelForQuestionAnswering``) reads config.json's ``auto_map``, imports the folder's copy of
``modeling_cofi_compact.py`` (torch + transformers only, no cofi) and loads ``model.safetensors``
into it under the same tensor names as ``CompactModel``. ``model_type`` is ``cofi_compact`` so that
transformers never mistakes the folder for a dense BERT/RoBERTa (whose classes would load the
ragged weights wrongly); the architecture is ``base_model_type``.

The model card (README.md) states what the folder's saver knows: base model, task, structure,
parameters and sparsity; accuracy and measured speedup when the caller passes them
(``write_model_card``; ``cofi demo`` does).
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CompactConfig

MODELING_FILE = "modeling_cofi_compact.py"
CARD_NAME = "README.md"
CARD_MARK = "<!-- written by cofi: rewritten when the folder is saved again -->"
_CLASSES = {"sequence_classification": ("AutoModelForSequenceClassification", "CofiCompactForSequenceClassification"),
            "question_answering": ("AutoModelForQuestionAnswering", "CofiCompactForQuestionAnswering")}


def hf_keys(model_type: str, task: str) -> dict[str, Any]:
    """The transformers keys of config.json for a compact ``model_type`` (bert | roberta) and ``task``."""
    from .config import HF_MODEL_TYPE

    auto, cls = _CLASSES.get(task, _CLASSES["sequence_classification"])
    module = MODELING_FILE.removesuffix(".py")
    return {"model_type": HF_MODEL_TYPE, "base_model_type": model_type, "architectures": [cls],
            "auto_map": {"AutoConfig": f"{module}.CofiCompactConfig", auto: f"{module}.{cls}"}}


def write_remote_code(directory: str | Path) -> Path:
    """Copy the self-contained modeling file into ``directory``."""
    dst = Path(directory) / MODELING_FILE
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), dst)
    return dst


def total_params(cfg: CompactConfig) -> int:
    """All parameters of the model without zero padding: embeddings (+ LayerNorm), encoder (paper
    count), task head; the distillation projection (unused at inference) is left out."""
    d = cfg.real_hidden_size
    n = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d + cfg.encoder_params()
    if cfg.task == "question_answering":
        return n + 2 * d + 2
    c = cfg.classifier_size or cfg.original_hidden_size
    return n + d * c + c + c * cfg.num_labels + cfg.num_labels


def _fmt_metrics(m: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def model_card(cfg: CompactConfig, *, accuracy: Mapping[str, Mapping[str, Any]] | None = None,
               speedup: Mapping[str, Mapping[str, float]] | None = None, base_model: str | None = None,
               notes: list[str] | None = None) -> str:
    """README.md text. ``accuracy``: split -> {metric: value} (e.g. {"dev": {...}, "test": {...}});
    ``speedup``: setting -> {"teacher_s", "compact_s", "speedup"} measured side by side."""
    t = cfg.task_spec or {}
    base = base_model or cfg.base_model or "unknown (not recorded when the folder was saved)"
    heads = [h if a else 0 for h, a in zip(cfg.num_heads, cfg.attention_present)]
    ffn = [w - z if f else 0 for w, z, f in zip(cfg.intermediate_sizes, cfg.zero_ffn_units, cfg.ffn_present)]
    auto = _CLASSES.get(cfg.task, _CLASSES["sequence_classification"])[0]
    lines = ["---", "library_name: transformers", "tags:", "- cofi", "- structured-pruning", "---", CARD_MARK, "",
             f"# CoFi-pruned {cfg.model_type} ({cfg.task.replace('_', ' ')})", "",
             f"- base model: `{base}`"]
    if t:
        labels = t.get("label_names") or f"integer class ids 0..{t.get('num_labels', cfg.num_labels) - 1}"
        lines.append(f"- task: `{t.get('name')}` ({t.get('kind')}); text column(s) {t.get('text_fields')}, "
                     f"label column `{t.get('label_field')}`, {cfg.num_labels} classes: {labels}")
    else:
        lines.append(f"- task: {cfg.task.replace('_', ' ')}, {cfg.num_labels} outputs (training task not recorded)")
    lines += [(f"- encoder parameters: {cfg.encoder_params():,} of {cfg.full_encoder_params():,} "
               f"(sparsity {1 - cfg.encoder_params() / cfg.full_encoder_params():.4f}; counted as in the CoFi "
               "paper: layer weights, biases and LayerNorms)"),
              f"- all parameters (embeddings, encoder, task head): {total_params(cfg):,}",
              (f"- structure: {cfg.num_layers} layers; heads per layer {heads} (of {cfg.original_num_heads}); "
               f"FFN units per layer {ffn} (of {cfg.original_intermediate_size}); hidden size "
               f"{cfg.real_hidden_size} (of {cfg.original_hidden_size})")]
    if accuracy:
        for split, m in accuracy.items():
            if m:
                lines.append(f"- {split}: {_fmt_metrics(m)}")
    else:
        lines.append("- accuracy: not measured by the saver (`cofi eval FOLDER --eval-file FILE` measures it)")
    if speedup:
        for k, v in speedup.items():
            shape = f" x {v['seq']}" if "seq" in v else ""
            lines.append(f"- latency {k}{shape}: dense {v['teacher_s'] * 1e3:.1f} ms, compact {v['compact_s'] * 1e3:.1f} ms, "
                         f"speedup {v['speedup']:.2f}x (measured side by side, same machine)")
    else:
        lines.append("- speedup: not measured by the saver")
    lines += [f"- {n}" for n in notes or []]
    lines += ["", "## Use", "", "```python", "from transformers import AutoTokenizer, " + auto,
              f"model = {auto}.from_pretrained(folder, trust_remote_code=True)  # {MODELING_FILE}: torch + transformers",
              "tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # reads config.json too", "```", "",
              ("With cofi installed, `cofi.runtime.CompactModel.from_pretrained(folder)` runs the same weights on "
               "cofi's fused kernels; `cofi eval folder` evaluates it, `cofi export folder` writes ONNX."), ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, cfg: CompactConfig, **kw: Any) -> Path | None:
    """Write README.md (``model_card(cfg, **kw)``) unless the folder holds a README cofi did not
    write (a user's own card is never replaced); the path written, or None."""
    p = Path(directory) / CARD_NAME
    if p.exists():
        try:
            ours = CARD_MARK in p.read_text(errors="replace")[:400]
        except OSError:
            ours = False
        if not ours:
            return None
    p.write_text(model_card(cfg, **kw))
    return p
