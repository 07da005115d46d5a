"""benchmarks/report.py loaded as a module for the renderer tests (benchmarks/ is not a package)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cofi_bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
