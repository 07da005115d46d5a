"""``cofi info`` / ``python -m cofi.info``: versions, build flags, backends and devices."""
from __future__ import annotations

import argparse
import json
import platform

import torch

from . import __version__, _ext
from .ops import backends


def collect() -> dict:
    """Everything ``cofi info`` prints, as a dict (also used by benchmarks to tag results)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # pragma: no cover - install dependent
        triton_version = f"not importable ({type(e).__name__})"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "cofi": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "native_extension": "loaded" if _ext.native_loaded() else f"not loaded: {_ext.native_error()}",
        "build": _ext.build_info(),
        "devices": devices,
        "backends": backends(),
    }


def format_report(info: dict) -> str:
    lines = [f"cofi {info['cofi']}  (python {info['python']}, {info['platform']})",
             f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, threads {info['threads']}",
             f"native extension: {info['native_extension']}"]
    b = info["build"]
    if b:
        lines.append("build: " + ", ".join(f"{k}={v}" for k, v in b.items()))
    lines.append("devices: " + "; ".join(info["devices"]))
    lines.append("")
    lines.append(f"{'op':30s} {'backend':10s} {'cpu':24s} cuda")
    for op, row in info["backends"].items():
        for backend, per_dev in row.items():
            cells = [("available" if v == "available" else "no: " + "; ".join(v)) for v in per_dev.values()]
            lines.append(f"{op:30s} {backend:10s} {cells[0]:24s} {cells[1]}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(argparse.Namespace(json=False)))
