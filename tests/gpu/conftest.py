"""tests/gpu: run on a CUDA device (tools/gpu_check.sh on a lent GPU), skipped cleanly without one.

Every test here is marked ``gpu`` and takes the ``dev`` fixture. ``COFI_GPU_TESTS_ON=cpu`` runs the
same tests on the CPU (a dry run of the test code itself; Triton and native-CUDA cases skip).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ON = os.environ.get("COFI_GPU_TESTS_ON", "cuda")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: tests/gpu, needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    for it in mine:
        it.add_marker(pytest.mark.gpu)
    if ON == "cpu" or torch.cuda.is_available():
        return
    why = f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
    for it in mine:
        it.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def dev() -> torch.device:
    return torch.device("cpu" if ON == "cpu" else "cuda")
