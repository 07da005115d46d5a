"""`cofi info` and the build record."""
from __future__ import annotations

import json
import subprocess
import sys

import cofi
from cofi import _ext
from cofi.cli import main
from cofi.info import collect


def test_info_collect_has_backends_and_build():
    info = collect()
    assert info["cofi"] == cofi.__version__
    assert "hard_concrete_sample" in info["backends"]
    if _ext.native_loaded():
        assert info["build"].get("torch"), "setup.py must write python/cofi/_build_info.json"
        assert info["backends"]["hard_concrete_sample"]["native"]["cpu"] == "available"


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["torch"]
    assert set(out["backends"]["hard_concrete_sample"]) == {"native", "triton", "sdpa", "reference"}
    # sdpa is masked_attention's only: every other op reports it as not implemented
    assert out["backends"]["hard_concrete_sample"]["sdpa"]["cpu"] == ["not implemented for this op"]
    assert out["backends"]["masked_attention"]["sdpa"] == {"cpu": "available", "cuda": "available"}


def test_python_m_cofi_info_runs():
    r = subprocess.run([sys.executable, "-m", "cofi.info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hard_concrete_sample" in r.stdout and "native" in r.stdout
