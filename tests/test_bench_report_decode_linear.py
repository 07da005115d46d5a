"""benchmarks/report.py's decode_linear section: a row per weight and dtype, ratios and reached
fractions from the file's times, the ratio ranges, skipped cases and the load caveat."""
from __future__ import annotations

from bench_report import load_report as _report


def _row(proj: str, n: int, k: int, rows: int, dtype: str, dl_ms: float, fl_ms: float, read_gb_s: float) -> dict:
    nbytes = n * k * (4 if dtype == "float32" else 2)
    t = {"decode_linear": dl_ms, "f_linear": fl_ms}
    return {"model": "SmolLM2-135M", "sparsity": 0.5 if proj == "o" else 0.0, "proj": proj, "N": n, "K": k,
            "rows": rows, "dtype": dtype, "weight_bytes": nbytes,
            "times": {p: {"p50_ms": v, "n": 10} for p, v in t.items()},
            "reached": {p: nbytes / (v / 1e3) / 1e9 / read_gb_s for p, v in t.items()}}


def test_decode_linear_table() -> None:
    bw = 20.0
    rows = [_row("qkv", 1000, 500, 1, "float32", 0.125, 0.25, bw), _row("qkv", 1000, 500, 8, "float32", 0.2, 0.5, bw),
            _row("o", 500, 400, 1, "bfloat16", 0.04, 0.05, bw)]
    data = {"meta": {"threads": 2, "load_avg": [3.0, 3.5], "wall_s": 70.0, "command": "python b.py"},
            "read_bandwidth_gb_s": bw, "read_bandwidth_runs_gb_s": [bw, 18.0], "stream_bytes": 2 ** 28,
            "skipped": ["Llama-3.2-1B lm_head [128256, 2048] float32: needs ~3 GiB"], "rows": rows}
    text = _report().render_decode_linear("results/cpu/decode_linear.json", data)
    qkv = next(line for line in text.splitlines() if line.startswith("| SmolLM2-135M qkv |"))
    # 2 MB in 125 us = 16 GB/s = 0.80 of 20; F.linear 0.40; ratio 2; rows 8: 0.50 / 0.20, 2.5x
    assert "| 1000 x 500 | float32 | 1.91 | 125 (0.80) | 250 (0.40) | 2.00x | 200 (0.50) | 500 (0.20) | 2.50x |" in qkv
    o = next(line for line in text.splitlines() if line.startswith("| SmolLM2-135M o @50 % |"))
    assert o.endswith("| 1.25x | - | - | - |")
    assert "float32 rows 1 2.00-2.00x; float32 rows 8 2.50-2.50x; bfloat16 rows 1 1.25-1.25x" in text
    assert "Not run: Llama-3.2-1B lm_head" in text
    assert "20.0 / 18.0" in text and "*Caveat:*" in text and "load average 3.0-3.5" in text
