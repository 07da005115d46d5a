"""cofi::llama_decode_step (every layer of a decoding step in one native call) equals the runtime's
per-op path: ragged layers (padded query groups, a layer without MLP, one without attention), biases,
padded batches, float32 and bfloat16; the cache it writes is the per-op path's; opcheck."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from cofi import _ext
from cofi.ops import last_backend
from cofi.pruning.fold_llama import fold_llama
from cofi.runtime import llama_runtime
from cofi.runtime.generate import left_pad
from cofi.runtime.llama_runtime import LlamaRuntime

sys.path.insert(0, os.path.dirname(__file__))
from llama_tiny import V, pair, ragged_masks

pytestmark = pytest.mark.skipif(not _ext.has_kernel("llama_decode_step", "CPU"),
                                reason="cofi._C without llama_decode_step")


def decode(rt: LlamaRuntime, prompts: list[list[int]], steps: torch.Tensor, native: bool, monkeypatch):
    """Logits of the prompt's last tokens and of each decoded token [B, 1 + n, V], and the cache."""
    monkeypatch.setattr(llama_runtime, "native_step", (lambda *a: True) if native else (lambda *a: False))
    ids, am = left_pad(prompts, 0)
    padded = len({len(p) for p in prompts}) > 1
    with torch.inference_mode():
        cache = rt.new_cache(len(prompts), ids.shape[1] + steps.shape[1])
        out = [rt(ids, am if padded else None, cache, last_only=True)]
        for t in range(steps.shape[1]):
            out.append(rt(steps[:, t:t + 1], None, cache))
            assert last_backend("llama_decode_step") == ("native" if native else "torch")
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("kind", ["llama", "llama_bias", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(7,), (9, 3, 6)])
def test_native_step_equals_per_op_path(kind, dtype, lengths, monkeypatch):
    _, m = pair(kind, dtype=torch.float32)
    rt = LlamaRuntime(fold_llama(m, ragged_masks(m.shape))).to(dtype)
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]
    steps = torch.randint(3, V, (len(lengths), 5), generator=g)
    want, c0 = decode(rt, prompts, steps, False, monkeypatch)
    got, c1 = decode(rt, prompts, steps, True, monkeypatch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= tol * scale
    for a, b in zip(c0.k + c0.v, c1.k + c1.v):
        assert (a is None) == (b is None)
        if a is not None:
            n = c0.length
            assert (a[:, :, :n].float() - b[:, :, :n].float()).abs().max() <= tol * max(1.0, a.float().abs().max())


def test_refuses_a_cache_of_the_wrong_shape():
    _, m = pair("llama", dtype=torch.float32)
    rt = LlamaRuntime(fold_llama(m, ragged_masks(m.shape)))
    params, dims = rt.step_args()
    r = torch.randn(1, rt.embed.shape[1])
    cs = torch.randn(1, rt.head_dim)
    bad = [torch.empty(1, 5, 4, rt.head_dim) for _ in rt.layers]
    with pytest.raises(RuntimeError, match="K/V cache must be"):
        torch.ops.cofi.llama_decode_step(r, params, dims, cs, cs, bad, bad, 1, None, rt.head_dim, rt.eps)


def test_opcheck():
    _, m = pair("llama", dtype=torch.float32)
    rt = LlamaRuntime(fold_llama(m, ragged_masks(m.shape)))
    params, dims = rt.step_args()
    cache = rt.new_cache(2, 6)
    none = torch.empty(0)
    k = [none if t is None else t.normal_() for t in cache.k]
    v = [none if t is None else t.normal_() for t in cache.v]
    r, cs = torch.randn(2, rt.embed.shape[1]), torch.randn(2, rt.head_dim)
    args = (r, params, dims, cs, cs.cos(), k, v, 3, None, rt.head_dim, rt.eps)
    for extra in ((), (rt.norm, rt.lm_head)):  # the layers only; with the final norm and the head (logits)
        torch.library.opcheck(torch.ops.cofi.llama_decode_step, args + extra,
                              test_utils=("test_schema", "test_faketensor"))


def test_baseline_paths_without_avx2():
    """The plain-loop kernels (CPUs without AVX2; COFI_CPU_AVX2=0 forces them) pass the same checks."""
    import subprocess

    here = os.path.dirname(__file__)
    env = dict(os.environ, COFI_CPU_AVX2="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
           "test_native_step_equals_per_op_path or test_matches_float64",
           os.path.join(here, "test_llama_decode_step.py"), os.path.join(here, "test_decode_linear.py")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
