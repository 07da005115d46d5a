"""What a run leaves in its output folder besides checkpoints and the metrics log: model folders
(``best`` / ``final`` of fine-tuning and pruning, ``compact_folded`` / ``compact`` of stage 2) and
``results.json``. Writers are called on rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as C


def save_model(d: Path, model: torch.nn.Module, tokenizer) -> None:
    """A transformers model folder: weights + config + tokenizer (fine-tuning's best / final)."""
    model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))


def save_pruned(d: Path, student: torch.nn.Module, tokenizer, masks, maskset: torch.nn.Module,
                proj: torch.nn.Module | None, metrics: dict) -> None:
    """Full-size student + deterministic masks + mask parameters + projection + metrics."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    save_file({k: v.contiguous() for k, v in masks.state_dict().items()}, str(d / "masks.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in maskset.state_dict().items()},
              str(d / "mask_params.safetensors"))
    if proj is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in proj.state_dict().items()},
                  str(d / "layer_transformation.safetensors"))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))


def pruned_source(out: Path) -> Path:
    """The pruning stage's folder stage 2 folds: ``best`` if an evaluation qualified, else ``final``."""
    return out / "best" if (out / "best" / "masks.safetensors").exists() else out / "final"


def write_results(out: Path, results: dict) -> None:
    C.atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
