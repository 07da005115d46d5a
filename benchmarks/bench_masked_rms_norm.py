"""masked_rms_norm on SmolLM2 rows: fused native vs the eager masked reference vs F.rms_norm.

Cases and providers: ``cofi.bench.masked_rms_norm``, the same code as ``cofi bench --op masked_rms_norm``.
This script merges its rows into benchmarks/results/<device>/masked_rms_norm.json.

    python benchmarks/bench_masked_rms_norm.py [--quick] [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _harness as H  # noqa: E402

if __name__ == "__main__":
    H.run_op_script("masked_rms_norm")
