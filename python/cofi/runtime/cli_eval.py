"""``cofi eval DIR --task TASK``: metric, real parameter count and sparsity of a compact model folder."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="folder written by CompactModel.save_pretrained (with tokenizer files)")
    p.add_argument("--task", required=True, help="task name known to cofi.data (classification tasks)")
    p.add_argument("--eval-file", default=None)
    p.add_argument("--train-file", default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--pad", type=int, default=None,
                   help="zero-pad hidden size and FFN widths to a multiple of this (exact; often faster)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from transformers import AutoTokenizer

    from ..data import compute_metrics, encode_classification, get_spec, load_task
    from .inference import predict
    from .modeling import CompactModel

    model = CompactModel.from_pretrained(args.model_dir, pad=args.pad)
    spec = get_spec(args.task)
    if spec.kind == "qa":
        raise SystemExit("cofi eval: QA evaluation of compact folders is not wired yet (use the trainer's eval)")
    _, ds = load_task(spec, train_file=args.train_file, eval_file=args.eval_file)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    enc = encode_classification(spec, ds, tok, args.max_length)
    if args.limit:
        enc = enc.subset(args.limit)
    feats = [{"input_ids": ids, **({"token_type_ids": enc.token_type_ids[i]} if enc.token_type_ids else {})}
             for i, ids in enumerate(enc.input_ids)]
    logits = predict(model, feats, batch_size=args.batch_size, pad_token_id=enc.pad_id)["logits"]
    preds = logits[:, 0].numpy() if spec.kind == "regression" else logits.argmax(-1).numpy()
    metrics = compute_metrics(spec.metrics, preds, np.asarray(enc.labels))
    report = {"task": args.task, "n": len(feats), **metrics,
              "encoder_params": model.num_encoder_params(), "full_encoder_params": model.config.full_encoder_params(),
              "sparsity": model.sparsity(), "hidden_size": model.config.real_hidden_size,
              "padded_hidden_size": model.config.hidden_size,
              "num_heads": model.config.num_heads, "intermediate_sizes": model.config.intermediate_sizes}
    print(json.dumps(report, indent=1))
    return 0
