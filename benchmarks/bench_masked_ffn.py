"""masked_ffn on BERT-base FFN sizes: native vs the eager masked reference vs a dense FFN.

Cases and providers: ``cofi.bench.masked_ffn``, the same code as ``cofi bench --op masked_ffn``.
This script merges its rows into benchmarks/results/<device>/masked_ffn.json (for benchmarks/report.py).

    python benchmarks/bench_masked_ffn.py [--quick] [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

if __name__ == "__main__":
    H.run_op_script("masked_ffn")
