"""Op microbenchmarks: ``cofi bench``, benchmarks/bench_<op>.py, ``make bench`` and tools/gpu_check.sh.

One module per op (``masked_attention``, ``masked_ffn``, ``masked_layer_norm``, ``masked_rms_norm``,
``hard_concrete``)
defines its cases and providers as an ``OpBench`` (``core``); ``core.run`` checks every provider
against the eager reference and times it; ``harness`` holds the timing and result-file helpers.
"""
from __future__ import annotations

import importlib

from .core import OpBench, Settings, run, table_rows

OPS = ("masked_attention", "masked_ffn", "masked_layer_norm", "masked_rms_norm", "hard_concrete")


def bench(op: str) -> OpBench:
    """The ``OpBench`` of ``op`` (one of ``OPS``)."""
    if op not in OPS:
        raise KeyError(f"no benchmark for {op!r} (have: {', '.join(OPS)})")
    return importlib.import_module(f"{__name__}.{op}").BENCH


__all__ = ["OPS", "OpBench", "Settings", "bench", "run", "table_rows"]
