"""benchmarks/report.py's decode_structure section: a row per dtype and sparsity with the step's,
the kernel's and the structure's fractions; bench_decode_structure --quick writes what it reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench_report import load_report as _report

ROOT = Path(__file__).resolve().parents[1]


def test_decode_structure_table() -> None:
    row = {"dtype": "bfloat16", "sparsity": 0.5, "bytes": 160e6, "step_ms": 8.0, "one_gemv_ms": 5.0, "sum_ms": 5.5,
           "step_gb_s": 20.0, "one_gemv_gb_s": 32.0, "sum_gb_s": 29.1, "step_of_sum": 5.5 / 8.0,
           "gemv_of_sum": 1.1, "step_of_gemv": 5.0 / 8.0, "rounds": 8}
    data = {"meta": {"threads": 2, "load_avg": [0.5, 0.6], "wall_s": 60.0, "command": "python b.py", "source": "x"},
            "rows": [row]}
    text = _report().render_decode_structure("results/cpu/decode_structure.json", data)
    line = next(x for x in text.splitlines() if x.startswith("| bfloat16 |"))
    assert line == "| bfloat16 | 0.5 | 160 | 8.00 (20.0) | 5.00 (32.0) | 5.50 (29.1) | 0.69 | 1.10 | 0.62 |"


def test_quick_run_renders(tmp_path: Path) -> None:
    out = tmp_path / "decode_structure_quick.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_structure.py"), "--quick", "--out",
                    str(out)], check=True, env=env, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert [(r["dtype"], r["sparsity"]) for r in data["rows"]] == [("float32", 0.5), ("float32", 0.7),
                                                                    ("bfloat16", 0.5), ("bfloat16", 0.7)]
    assert "| float32 | 0.5 |" in _report().render_decode_structure(str(out), data)
