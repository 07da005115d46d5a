"""``cofi export DIR --format onnx|torch_export``: export a compact model folder, checked against PyTorch."""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="folder written by CompactModel.save_pretrained")
    p.add_argument("--format", choices=("onnx", "torch_export"), default="onnx")
    p.add_argument("--out", default=None, help="output file (default DIR/model.onnx or DIR/model.pt2)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported model against PyTorch")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError
    from .export import export_onnx, export_program
    from .modeling import CompactModel

    model = CompactModel.from_pretrained(args.model_dir)
    out = args.out or os.path.join(args.model_dir, "model.onnx" if args.format == "onnx" else "model.pt2")
    if os.path.isdir(out):
        raise UserError(f"cofi export: --out {out} is a folder; give a file name (e.g. {os.path.join(out, 'model.onnx')})")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UserError(f"cofi export: --out {out}: {parent} is a file, not a folder")
    os.makedirs(parent, exist_ok=True)
    if args.format == "onnx":
        export_onnx(model, out, check=not args.no_check)
    else:
        torch.export.save(export_program(model, check=not args.no_check), out)
    print(f"cofi export: wrote {out}" + ("" if args.no_check else " (checked against PyTorch)"))
    return 0
