"""benchmarks/bench_generate.py's logit checks (``check_pairs``) on tiny models: float32 pairs agree;
bf16 pairs record both sides' errors against the float32 evaluation of the same weights; a runtime
computing another function, or rounding much worse than transformers, is refused."""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime.llama_export import export_llama
from cofi.runtime.llama_runtime import LlamaRuntime

sys.path.insert(0, os.path.dirname(__file__))
from llama_tiny import V, pair, uniform_masks

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cofi_bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def runtime_pair(tmp: Path, dtype: torch.dtype) -> tuple[LlamaRuntime, torch.nn.Module]:
    """(runtime, transformers model of the exported stock checkpoint) of a pruned tiny model in ``dtype``."""
    _, m = pair("llama", dtype=torch.float32)
    compact = fold_llama(m.to(dtype), uniform_masks(m.shape))
    folder = export_llama(compact, tmp / str(dtype)[6:])
    return LlamaRuntime(compact), T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def test_float32_pair_agrees(bench, tmp_path):
    checks = bench.check_pairs({"pruned": runtime_pair(tmp_path, torch.float32)}, V)
    assert set(checks["pruned"]) == {"rt_vs_hf"} and checks["pruned"]["rt_vs_hf"] < 1e-5


def test_bf16_pair_records_both_errors_and_refuses_a_wrong_runtime(bench, tmp_path):
    rt, hf = runtime_pair(tmp_path, torch.bfloat16)
    c = bench.check_pairs({"pruned": (rt, hf)}, V)["pruned"]
    assert set(c) == {"rt_vs_hf", "f32_rt_vs_hf", "rt_err", "hf_err"}
    assert c["f32_rt_vs_hf"] < 1e-3 and 0 < c["rt_err"] <= bench.CHECK_HALF_RATIO * c["hf_err"] + bench.CHECK_HALF_FLOOR

    wrong = copy.deepcopy(rt)
    wrong.layers[0].down_w.mul_(1.1)  # another function: caught on the float32 copies
    with pytest.raises(SystemExit, match="float32 copies of the same bfloat16 weights"):
        bench.check_pairs({"pruned": (wrong, hf)}, V)

    coarse = copy.deepcopy(rt)  # the same function, projections' inputs rounded to 5 bits in bf16 only
    exact = coarse.linear
    g = torch.Generator().manual_seed(0)

    def noisy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            x = (x.float() * (1 + 2 ** -5 * torch.randn(x.shape, generator=g))).to(x.dtype)
        return exact(x, w, b)

    coarse.linear = noisy
    with pytest.raises(SystemExit, match="relative from the float32 evaluation"):
        bench.check_pairs({"pruned": (coarse, hf)}, V)
