"""benchmarks/report.py's runtime_ort section: ratios from the file's times, and the generated
'where cofi wins or loses' note naming each shape on the right side."""
from __future__ import annotations

from bench_report import load_report as _report


def _row(batch: int, sparsity: float, **ms: float) -> dict:
    times = {"dense": 100.0, "ort_dense": 80.0, "ort_dense_fused": 60.0} | ms
    return {"batch": batch, "seq": 128, "real_sparsity": sparsity,
            "times": {k: {"p50_ms": v, "n": 4} for k, v in times.items()}}


def test_runtime_ort_table_and_note() -> None:
    data = {"env": {"threads": 2}, "meta": {"threads": 2, "load_avg": [0.5, 0.8]}, "model": "MiniLM-L6",
            "onnxruntime": "1.0",
            "rows": [_row(32, 0.6, compact=40.0, ort_compact=50.0, compact_skip=20.0),
                     _row(1, 0.9, compact=4.0, ort_compact=2.0, compact_skip=1.0)]}
    text = _report().render_runtime_ort_file("results/cpu/runtime_ort.json", data)
    row32 = next(line for line in text.splitlines() if line.startswith("| 32 x 128"))
    # pruning buys torch 100/40, ort 80/50; cofi vs ort compact 50/40; skip 50/20; fused 60/20
    assert "| 2.50x / 1.60x | 1.25x | 2.50x | 3.00x |" in row32
    like, deployed = (line for line in text.splitlines() if line.startswith("- "))
    assert "wins at 32 x 128 at 0.60 (1.25x); loses at 1 x 128 at 0.90 (0.50x)" in like
    assert "wins at 32 x 128 at 0.60 (2.50x), 1 x 128 at 0.90 (2.00x); loses nowhere" in deployed
    assert "Caveat" not in text
