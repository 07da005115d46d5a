"""masked_attention: cofi's backends vs the eager masked reference vs SDPA on all heads.

Cases and providers: ``cofi.bench.masked_attention``, the same code as ``cofi bench --op masked_attention``.
This script merges its rows into benchmarks/results/<device>/masked_attention.json (for benchmarks/report.py).

    python benchmarks/bench_masked_attention.py [--quick] [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

if __name__ == "__main__":
    H.run_op_script("masked_attention")
