"""One training step's mask work for a BERT-base mask set: fused cofi ops vs the eager reference.

Cases and providers: ``cofi.bench.hard_concrete``, the same code as ``cofi bench --op hard_concrete``.
This script merges its rows into benchmarks/results/<device>/hard_concrete.json (for benchmarks/report.py).

    python benchmarks/bench_hard_concrete.py [--quick] [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

if __name__ == "__main__":
    H.run_op_script("hard_concrete")
