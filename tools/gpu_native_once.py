"""Call every native kernel once (forward and backward), for ``compute-sanitizer --tool memcheck``.

The inputs are tests/gpu/test_gpu_ops.py's cases (odd sizes, dead units, padding, an empty key row);
attention also runs with dropout. Each call is checked against the reference (relative error), so a
kernel that writes out of bounds *and* one that writes the wrong values both show. Run it with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own allocation and memcheck sees overruns
past it (tools/gpu_check.sh does). Exit status 1 when a kernel is missing or wrong.

    python tools/gpu_native_once.py [--device cuda|cpu] [--backend native]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    spec = importlib.util.spec_from_file_location("gpu_cases", ROOT / "tests" / "gpu" / "test_gpu_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="native")
    args = ap.parse_args()
    dev = torch.device(args.device)
    from cofi.ops import _backends as B

    m = _cases()
    runs = [(op, m.CASES[op], {}) for op in B.ops() if op in m.CASES and args.backend in B.op_backends(op)]
    runs.append(("masked_attention", m.attention_case, {"dropout_p": 0.2}))
    bad = 0
    for op, make, kw in runs:
        t0 = time.perf_counter()
        call, leaves = make(dev, **kw) if kw else make(dev)
        try:
            m.assert_close_to_reference(call, leaves, args.backend, m.FP32_ERR, op)
            status = "ok"
        except B.BackendError as e:
            status, bad = f"NOT RUN: {' '.join(str(e).split())}", bad + 1
        except AssertionError as e:
            status, bad = f"WRONG: {' '.join(str(e).split())}", bad + 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"{op}{' ' + str(kw) if kw else ''} [{args.backend}]: {status} ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    print(f"{len(runs) - bad} of {len(runs)} native calls ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
