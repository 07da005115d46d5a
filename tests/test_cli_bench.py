"""``cofi bench``: the op benchmarks on tiny shapes (checked providers, ratios, which backend ran,
the JSON file) and its user mistakes (one ``error:`` line, exit status 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cofi.bench import OPS, Settings, bench, run
from cofi.bench import hard_concrete as hc
from cofi.bench import masked_attention as attn
from cofi.bench import masked_ffn as ffn
from cofi.bench import masked_layer_norm as ln
from cofi.bench import masked_rms_norm as rms
from cofi.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(monkeypatch):
    """Every op benchmark on tiny shapes (the cases read these module constants per call)."""
    monkeypatch.setattr(attn, "CONFIGS", {"a": (1, 3, 8, 4), "tiny": (2, 3, 9, 4)})
    monkeypatch.setattr(attn, "GQA_CONFIGS", {"gqa": (1, 4, 2, 7, 4)})
    monkeypatch.setattr(ffn, "CONFIGS", {"tiny": (8, 16)})
    monkeypatch.setattr(ffn, "GATED_CONFIGS", {"tiny": (8, 16)})
    monkeypatch.setattr(ffn, "QUICK_TOKENS", 5)
    monkeypatch.setattr(ln, "D", 12)
    monkeypatch.setattr(ln, "QUICK_TOKENS", 6)
    monkeypatch.setattr(rms, "D", 12)
    monkeypatch.setattr(rms, "QUICK_TOKENS", 6)
    monkeypatch.setattr(hc, "CONFIGS", {"bert-base": (1, 8, 2, 16)})


def test_bench_all_ops_table_and_json(tiny, tmp_path, capsys):
    out = tmp_path / "sub" / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--min-run-time", "0.001", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for op in OPS:
        assert bench(op).doc in text
    assert "cofi_sdpa" in text and "vs sdpa" in text and "vs dense" in text and "* = what auto picks" in text
    data = json.loads(out.read_text())
    assert data["env"]["device_name"] == "cpu" and data["dtype"] == "float32"
    rows = data["rows"]
    assert {r["op"] for r in rows} == set(OPS)
    assert not [r for r in rows if "error" in r]
    a = {(r["provider"], r["mode"]): r for r in rows if r["op"] == "masked_attention" and r["shape"]["S"] == 9
         and r["shape"]["live_frac"] == 0.1}
    assert a[("cofi_sdpa", "fwd")]["backend_ran"] == "sdpa" and a[("sdpa", "fwd")]["vs_sdpa"] == 1.0
    assert a[("reference", "fwd_bwd")]["vs_reference"] == 1.0 and a[("native", "fwd")].get("auto") is True
    r = a[("cofi_sdpa", "fwd_bwd")]
    assert r["vs_reference"] == pytest.approx(a[("reference", "fwd_bwd")]["p50_ms"] / r["p50_ms"], rel=1e-2)


def test_bench_bfloat16_on_cpu_reports_what_cannot_run(tiny, capsys):
    # the native CPU masked_rms_norm kernel is float32/float64 only; native attention takes bf16
    assert main(["bench", "--op", "masked_attention", "masked_rms_norm", "--quick", "--dtype", "bfloat16",
                 "--min-run-time", "0.001"]) == 0
    text = capsys.readouterr().out
    assert "not run: cofi.ops.masked_rms_norm: backend 'native' cannot run this call" in text
    assert "bfloat16" in text and "cofi_sdpa" in text


def test_wrong_provider_is_reported_not_timed(tiny):
    rows = run(bench("masked_attention"), Settings("cpu", torch.float32, True, 0.001))
    assert all("p50_ms" in r for r in rows)
    b = bench("masked_attention")
    broken = type(b)(**{**b.__dict__, "providers": lambda s: b.providers(s) + [
        type(b.providers(s)[0])("broken", lambda q, k, v, z, causal=False: attn.masked_attention_ref(q, k, v, z, causal=causal) * 1.1)]})
    rows = run(broken, Settings("cpu", torch.float32, True, 0.001))
    bad = [r for r in rows if r["provider"] == "broken"]
    assert bad and all("relative error" in r["error"] and "p50_ms" not in r for r in bad)


@pytest.mark.parametrize("argv,match", [
    (["--op", "masked_nothing"], "argument --op: invalid choice"),
    (["--dtype", "float64"], "argument --dtype: invalid choice"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--min-run-time", "0"], "--min-run-time must be > 0 seconds"),
])
def test_mistakes_are_one_line(argv, match, capsys):
    try:
        rc = main(["bench", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.startswith("error: ") and err.count("\n") == 1


def test_existing_json_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("{}")
    assert main(["bench", "--op", "hard_concrete", "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bench: --device cuda, but torch") and err.count("\n") == 1


def test_bench_script_uses_the_package(tmp_path):
    """benchmarks/bench_<op>.py run cofi.bench's code and merge rows into their results file."""
    out = tmp_path / "hc.json"
    code = ("import sys, runpy; sys.argv = ['bench_hard_concrete.py', '--quick', '--min-run-time', '0.001', "
            f"'--out', {str(out)!r}]; import cofi.bench.hard_concrete as hc; "
            "hc.CONFIGS = {'bert-base': (1, 8, 2, 16)}; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_hard_concrete.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert {r["provider"] for r in rows} == {"reference", "native", "native_unfused"}
    assert all(r["op"] == "hard_concrete" and "p50_ms" in r for r in rows)
