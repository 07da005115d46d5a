"""masked_layer_norm on BERT-base rows: fused native vs the eager masked reference vs nn.LayerNorm.

Cases and providers: ``cofi.bench.masked_layer_norm``, the same code as ``cofi bench --op masked_layer_norm``.
This script merges its rows into benchmarks/results/<device>/masked_layer_norm.json (for benchmarks/report.py).

    python benchmarks/bench_masked_layer_norm.py [--quick] [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

if __name__ == "__main__":
    H.run_op_script("masked_layer_norm")
