"""``cofi eval DIR``: metric, real parameter count and sparsity of a compact model folder (or of a
fine-tuned full model folder, e.g. the teacher) on the task it remembers or on the user's data."""
from __future__ import annotations

import argparse
import json

from ..cli import int_at_least
from ..vocab import PRECISION_DTYPES


def _fields(text: str) -> list[str]:
    """``--text-fields a,b`` (as cofi finetune/prune read it): one or two column names."""
    cols = [c for c in text.replace("+", ",").split(",") if c]
    if not 1 <= len(cols) <= 2:
        raise argparse.ArgumentTypeError(f"must name one or two columns (comma-separated), got {text!r}")
    return cols


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a compact model folder (cofi prune: <output_dir>/compact) or a fine-tuned "
                                     "model folder (cofi finetune: <output_dir>/best)")
    p.add_argument("--task", default=None, help="task name known to cofi.data (default: the task the folder was "
                                                "trained on; custom = your own --eval-file)")
    p.add_argument("--eval-file", default=None, help="data to evaluate on (csv/tsv/json/jsonl/parquet); default: "
                                                     "the task's own evaluation split")
    p.add_argument("--eval-split", default=None, help="split of the task's own data (e.g. test for rotten_tomatoes)")
    p.add_argument("--train-file", default=None,
                   help="training data, only to map label names to class ids for folders that do not record them")
    p.add_argument("--text-fields", type=_fields, default=None, metavar="COL[,COL]",
                   help="one or two text columns (default: the columns the model was trained on)")
    p.add_argument("--label-field", default=None, metavar="COL",
                   help="label column (default: the one the model was trained on)")
    p.add_argument("--num-labels", type=int_at_least(1), default=None,
                   help="number of classes (checked against the model's)")
    p.add_argument("--tokenizer", default=None,
                   help="folder (or hub name) of the model's tokenizer, when model_dir holds no tokenizer files")
    p.add_argument("--max-length", type=int_at_least(2), default=None,
                   help="truncate inputs to this many tokens (default: 128, or the model's positions if fewer)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate the first N examples only")
    p.add_argument("--pad", type=int_at_least(1), default=None,
                   help="zero-pad hidden size and FFN widths to a multiple of this (exact; often faster; "
                        "compact folders)")
    p.add_argument("--precision", choices=tuple(PRECISION_DTYPES), default="fp32",
                   help="run the model cast to this dtype (bf16 / fp16: on CPU the per-op path, not the fused "
                        "encoder; logits compared as float32)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import TaskError, load_tokenizer
    from .evaluate import check_labels, eval_data, eval_spec, label_map_for, score
    from .model_folder import open_model_folder

    if args.train_file is not None and args.eval_file is None:
        raise TaskError("cofi eval: --train-file only maps label names; give the data to evaluate with --eval-file")
    if args.eval_file is not None and args.eval_split is not None:
        raise TaskError("cofi eval: give --eval-file or --eval-split, not both")
    em = open_model_folder(args.model_dir, pad=args.pad)
    em.model.to(getattr(torch, PRECISION_DTYPES[args.precision]))
    spec = eval_spec(em, task=args.task, text_fields=args.text_fields, label_field=args.label_field,
                     num_labels=args.num_labels)
    if args.max_length is None:
        args.max_length = min(128, em.positions)
    if args.max_length > em.positions:
        raise TaskError(f"cofi eval: --max-length {args.max_length} exceeds the model's {em.positions} positions; "
                        f"use --max-length {em.positions}")
    ds, where, first = eval_data(spec, eval_file=args.eval_file, eval_split=args.eval_split)
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    label_map = label_map_for(em, spec, args.train_file)
    check_labels(spec, ds, label_map, where, first, args.model_dir, args.train_file)
    tok = load_tokenizer(args.model_dir, vocab_size=em.vocab_size, tokenizer=args.tokenizer)
    metrics = score(em, spec, ds, tok, max_length=args.max_length, batch_size=args.batch_size, label_map=label_map)
    report = {"model_dir": str(args.model_dir), "model": em.kind, "task": spec.name, "data": where,
              "text_fields": list(spec.text_fields), "label_field": spec.label_field, "num_labels": em.num_labels,
              "precision": args.precision,
              **metrics, **em.structure}
    print(json.dumps(report, indent=1))
    return 0
