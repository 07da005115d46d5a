"""``cofi eval DIR --task TASK``: metric, real parameter count and sparsity of a compact model folder."""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..cli import int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="folder written by CompactModel.save_pretrained (cofi prune: <output_dir>/compact)")
    p.add_argument("--task", required=True, help="task name known to cofi.data (classification tasks)")
    p.add_argument("--eval-file", default=None)
    p.add_argument("--train-file", default=None)
    p.add_argument("--tokenizer", default=None,
                   help="folder (or hub name) of the model's tokenizer, when model_dir holds no tokenizer files")
    p.add_argument("--max-length", type=int_at_least(2), default=None,
                   help="truncate inputs to this many tokens (default: 128, or the model's positions if fewer)")
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate the first N examples only")
    p.add_argument("--pad", type=int_at_least(1), default=None,
                   help="zero-pad hidden size and FFN widths to a multiple of this (exact; often faster)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..data import (
        TaskError,
        compute_metrics,
        encode_classification,
        get_spec,
        labels_from,
        load_task,
        load_tokenizer,
    )
    from .inference import predict
    from .modeling import CompactModel

    model = CompactModel.from_pretrained(args.model_dir, pad=args.pad)
    cfg = model.config
    if cfg.task != "sequence_classification":
        raise TaskError(f"cofi eval: {args.model_dir} is a {cfg.task} model; cofi eval evaluates sequence "
                        "classification and regression models")
    spec = get_spec(args.task)
    if spec.kind == "qa":
        raise TaskError(f"cofi eval: --task {args.task} is question answering, which cofi eval does not evaluate "
                        "(use a classification or regression task)")
    n_out = cfg.num_labels
    if spec.kind == "regression" and n_out != 1:
        raise TaskError(f"cofi eval: --task {args.task} is a regression but the model has {n_out} outputs")
    if spec.kind == "classification":
        if n_out == 1:
            raise TaskError(f"cofi eval: the model has one output (a regression model) but --task {args.task} "
                            "is a classification")
        if args.task != "custom" and spec.num_labels != n_out:
            raise TaskError(f"cofi eval: --task {args.task} has {spec.num_labels} classes but the model has "
                            f"num_labels={n_out}")
        spec = dataclasses.replace(spec, num_labels=n_out)  # the data's labels must be the model's classes
    # positions past the table would index out of range (RoBERTa positions start after padding_idx)
    max_len = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if cfg.model_type == "roberta" else 0)
    if args.max_length is None:
        args.max_length = min(128, max_len)
    if args.max_length > max_len:
        raise TaskError(f"cofi eval: --max-length {args.max_length} exceeds the model's {max_len} positions "
                        f"(max_position_embeddings={cfg.max_position_embeddings}); use --max-length {max_len}")
    train, ds = load_task(spec, train_file=args.train_file, eval_file=args.eval_file)
    tok = load_tokenizer(args.model_dir, vocab_size=cfg.vocab_size, tokenizer=args.tokenizer)
    # label names map to ids as in training (sorted names of the training data)
    _, label_map = labels_from(spec, train[spec.label_field], where="train data")
    if args.limit is not None:
        ds = ds.select(range(min(args.limit, len(ds))))
    enc = encode_classification(spec, ds, tok, args.max_length, label_map=label_map)
    feats = [{"input_ids": ids, **({"token_type_ids": enc.token_type_ids[i]} if enc.token_type_ids else {})}
             for i, ids in enumerate(enc.input_ids)]
    logits = predict(model, feats, batch_size=args.batch_size, pad_token_id=enc.pad_id)["logits"]
    preds = logits[:, 0].numpy() if spec.kind == "regression" else logits.argmax(-1).numpy()
    metrics = compute_metrics(spec.metrics, preds, np.asarray(enc.labels))
    report = {"task": args.task, "n": len(feats), **metrics,
              "encoder_params": model.num_encoder_params(), "full_encoder_params": cfg.full_encoder_params(),
              "sparsity": model.sparsity(), "hidden_size": cfg.real_hidden_size,
              "padded_hidden_size": cfg.hidden_size,
              "num_heads": cfg.num_heads, "intermediate_sizes": cfg.intermediate_sizes}
    print(json.dumps(report, indent=1))
    return 0
