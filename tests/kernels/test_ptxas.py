"""tools/ptxas_check.py: parsing of ptxas -v logs and the local-memory policy (no nvcc needed; CI runs
the real check as its own stage, `make ptxas-check`)."""
from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import ptxas_check  # noqa: E402

sys.path.pop(0)

# Two kernels as ptxas 13.0 reported them for the attention kernels before the head-dim split.
LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN57_GLOBAL__N__13d0b263_24_masked_attention_cuda_cu_544a9d7913bwd_dq_kernelIfLi128EEEvPKT_S3_S3_S3_NS_7StridesES3_PKhPKlPKiixiiifjfPKfSC_PS1_' for 'sm_90'
ptxas info    : Function properties for _ZN57_GLOBAL__N__13d0b263_24_masked_attention_cuda_cu_544a9d7913bwd_dq_kernelIfLi128EEEvPKT_S3_S3_S3_NS_7StridesES3_PKhPKlPKiixiiifjfPKfSC_PS1_
    1160 bytes stack frame, 1284 bytes spill stores, 2292 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1160 bytes cumulative stack size, 32800 bytes smem
ptxas info    : Compiling entry function '_ZN57_GLOBAL__N__13d0b263_24_masked_attention_cuda_cu_544a9d7910fwd_kernelIfLi64EEEvPKT_S3_S3_NS_7StridesES3_PKhPKlPKiixiiifjfPS1_Pf' for 'sm_90'
ptxas info    : Function properties for _ZN57_GLOBAL__N__13d0b263_24_masked_attention_cuda_cu_544a9d7910fwd_kernelIfLi64EEEvPKT_S3_S3_NS_7StridesES3_PKhPKlPKiixiiifjfPS1_Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 16416 bytes smem
"""


def test_parse_and_demangle():
    ks = ptxas_check.parse_ptxas(LOG, "masked_attention")
    assert [(k.regs, k.stack, k.spill_stores, k.spill_loads, k.smem) for k in ks] == [
        (255, 1160, 1284, 2292, 32800), (168, 0, 0, 0, 16416)]
    assert [k.local_memory for k in ks] == [True, False]
    names = ptxas_check.demangle([k.name for k in ks])
    if ptxas_check.shutil.which("c++filt"):
        assert names == ["bwd_dq_kernel<float, 128>", "fwd_kernel<float, 64>"]


def _fake_compile(kernels_by_op):
    def compile_source(nvcc, src, arch):
        return [ptxas_check.Kernel(src.parent.name, n, 64, *lm, 0) for n, lm in kernels_by_op.get(src.parent.name, [])], \
            None, 0.0
    return compile_source


def test_policy_fails_only_strict_ops(monkeypatch, capsys):
    """Local memory in masked_attention fails; elsewhere it is a warning; one line per kernel."""
    monkeypatch.setattr(ptxas_check, "find_nvcc", lambda: "/fake/nvcc")
    monkeypatch.setattr(ptxas_check, "compile_source", _fake_compile({
        "masked_attention": [("fwd_kernel<float, 64>", (0, 0, 0)), ("bwd_dq_kernel<float, 128>", (8, 4, 4))],
        "masked_layer_norm": [("ln_fwd_kernel<float>", (16, 0, 0))]}))
    assert ptxas_check.main(["--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: masked_attention bwd_dq_kernel<float, 128>: 8 B stack, 4 B spill stores, 4 B spill loads" in out
    assert "warning: masked_layer_norm ln_fwd_kernel<float>" in out
    assert out.count("FAIL local memory") == 1 and "1 failing" in out.splitlines()[-1]
    monkeypatch.setattr(ptxas_check, "compile_source", _fake_compile({
        "masked_attention": [("fwd_kernel<float, 64>", (0, 0, 0))]}))
    assert ptxas_check.main(["--jobs", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": OK")


def test_no_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(ptxas_check, "find_nvcc", lambda: None)
    assert ptxas_check.main([]) == ptxas_check.EXIT_NO_TOOLCHAIN
    assert "no nvcc" in capsys.readouterr().out
