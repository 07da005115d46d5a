"""PNG plots of a pruning run (``cofi demo``): dev score and sparsity over steps, the Lagrange
multipliers, and the structure of the model delivered (read from the saved compact folder's
config.json, so the plot shows what was saved: not the masks at some evaluation)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def delivered_structure(compact_dir: str | Path) -> dict[str, Any]:
    """Heads and FFN units per layer (0 for a removed sublayer) and the hidden size of the saved
    compact model (zero padding not counted), with its encoder parameters and sparsity."""
    from .runtime.config import CompactConfig

    c = CompactConfig.load(compact_dir)
    return {"heads": [h if a else 0 for h, a in zip(c.num_heads, c.attention_present)],
            "ffn": [w - z if f else 0 for w, z, f in zip(c.intermediate_sizes, c.zero_ffn_units, c.ffn_present)],
            "hidden": c.real_hidden_size, "original_heads": c.original_num_heads,
            "original_ffn": c.original_intermediate_size, "original_hidden": c.original_hidden_size,
            "encoder_params": c.encoder_params(), "sparsity": 1 - c.encoder_params() / c.full_encoder_params()}


def run_plots(out: Path, metrics_path: Path, structure: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """``<prefix>accuracy_sparsity.png`` (dev score, expected/real sparsity over steps),
    ``<prefix>lambdas.png`` and, with ``structure`` (``delivered_structure``), ``<prefix>structure.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    ev = [r for r in recs if r.get("stage") == "prune" and "eval" in r]
    tr = [r for r in recs if r.get("stage") == "prune" and "lambda_1" in r and "eval" not in r]
    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{prefix}{name}", dpi=110)
        files.append(str(out / f"{prefix}{name}"))
        plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    metric = next(iter(ev[0]["eval"])) if ev else "accuracy"
    ax[0].plot([r["step"] for r in ev], [r["eval"][metric] for r in ev], "o-")
    ax[0].set(xlabel="step", ylabel=f"dev {metric}", title="dev score (deterministic masks)")
    ax[1].plot([r["step"] for r in tr], [r["expected_sparsity"] for r in tr], label="expected")
    ax[1].plot([r["step"] for r in ev], [r["real_sparsity"] for r in ev], "o-", label="real")
    ax[1].plot([r["step"] for r in tr], [r["target_sparsity"] for r in tr], "--", label="target")
    ax[1].set(xlabel="step", ylabel="sparsity", title="sparsity")
    ax[1].legend()
    save(fig, "accuracy_sparsity.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["lambda_1"] for r in tr], label="lambda_1")
    ax.plot([r["step"] for r in tr], [r["lambda_2"] for r in tr], label="lambda_2")
    ax.set(xlabel="step", title="Lagrange multipliers")
    ax.legend()
    save(fig, "lambdas.png")
    if structure:
        st = structure
        layers = range(1, len(st["heads"]) + 1)
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        ax[0].bar(layers, st["heads"])
        ax[0].set(xlabel="layer", ylabel=f"heads kept (of {st['original_heads']})", ylim=(0, st["original_heads"]),
                  title=f"saved compact model: heads per layer (hidden {st['hidden']} of {st['original_hidden']})")
        ax[1].bar(layers, st["ffn"])
        ax[1].set(xlabel="layer", ylabel=f"FFN units kept (of {st['original_ffn']})", ylim=(0, st["original_ffn"]),
                  title=f"FFN width per layer (sparsity {st['sparsity']:.4f})")
        save(fig, "structure.png")
    return files


def lm_run_plots(out: Path, prune: list[dict[str, Any]], recover: list[dict[str, Any]], structure: dict[str, Any],
                 dense_ppl: float | None = None) -> list[str]:
    """Plots of a decoder demo (``cofi demo --preset llm``): ``ppl_steps.png`` (in-training eval
    perplexity over the pruning steps, then the recovery steps of the compact model), ``sparsity_lambdas.png``
    (expected / target / delivered sparsity and the Lagrange multipliers over the pruning steps) and
    ``structure.png`` (query heads, K/V heads and SwiGLU units per original layer; 0 = layer dropped).
    ``prune``: cofi prune-lm's metrics.jsonl records; ``recover``: the recovery's; ``structure``:
    its results.json "structure" with "original" (the dense counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        files.append(str(out / name))
        plt.close(fig)

    ev = [r for r in prune if "eval_ppl" in r]
    rev = [r for r in recover if "eval_ppl" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in ev], [r["eval_ppl"] for r in ev], "o-", label="pruning (masked model)")
    ax.plot([r["step"] for r in rev], [r["eval_ppl"] for r in rev], "s-", label="recovery (compact model)")
    if dense_ppl is not None:
        ax.axhline(dense_ppl, ls="--", c="gray", label=f"dense {dense_ppl:.2f}")
    ax.set(xlabel="step", ylabel="eval perplexity", yscale="log", title="held-out perplexity over steps")
    ax.legend()
    save(fig, "ppl_steps.png")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in prune]
    ax[0].plot(steps, [r["expected_sparsity"] for r in prune], label="expected")
    ax[0].plot(steps, [r["target_sparsity"] for r in prune], "--", label="target (ramped)")
    ax[0].plot([r["step"] for r in ev], [r["real_sparsity"] for r in ev], "o", label="delivered")
    ax[0].set(xlabel="step", ylabel="body sparsity", title="sparsity (non-embedding parameters)")
    ax[0].legend()
    ax[1].plot(steps, [r["lambda_1"] for r in prune], label="lambda_1 (sum)")
    ax[1].plot(steps, [r["lambda_2"] for r in prune], label="lambda_2 (sum)")
    ax[1].set(xlabel="step", title="Lagrange multipliers")
    ax[1].legend()
    save(fig, "sparsity_lambdas.png")
    st, orig = structure, structure["original"]
    layers = range(len(st["query_heads"]))
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.4
    ax[0].bar([i - w / 2 for i in layers], st["query_heads"], w, label=f"query heads (of {orig['heads']})")
    ax[0].bar([i + w / 2 for i in layers], st["kv_heads"], w, label=f"K/V heads (of {orig['kv_heads']})")
    ax[0].set(xlabel="original layer", ylim=(0, orig["heads"]),
              title=f"heads per layer ({sum(st['attention'])} of {orig['layers']} layers kept)")
    ax[0].legend()
    ax[1].bar(layers, st["intermediate"])
    ax[1].set(xlabel="original layer", ylabel=f"SwiGLU units (of {orig['intermediate']})",
              ylim=(0, orig["intermediate"]), title=f"FFN width per layer (hidden {st['hidden']} of {orig['hidden']})")
    save(fig, "structure.png")
    return files
