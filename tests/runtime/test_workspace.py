"""The runtime's CPU workspace (csrc/cpu_workspace.h, cofi.runtime.workspace): reuse, results, scope."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
from masked_forward_ref import random_masks, tiny_hf_model  # noqa: E402

from cofi.pruning import prune  # noqa: E402
from cofi.runtime import workspace  # noqa: E402
from cofi.runtime.export import example_inputs  # noqa: E402

needs_workspace = pytest.mark.skipif(not workspace.available(), reason="cofi._C without the CPU workspace")
BIG = 64 * 1024  # bytes; smaller allocations are left to the default allocator


def _compact(seed=1, dtype=torch.float64):
    model = tiny_hf_model("bert", "cls", dtype, num_labels=3)
    return prune(model, random_masks(model.config, True, seed))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("COFI_WORKSPACE", raising=False)
    monkeypatch.delenv("COFI_WORKSPACE_MB", raising=False)
    return monkeypatch


@needs_workspace
@pytest.mark.parametrize("path", ["fused", "ops"])
def test_inference_reuses_blocks_and_results_match(env, path):
    """A second call of the same shape is served from blocks the first one freed (no new blocks),
    and outputs equal those computed with the workspace off, also after another model (other sizes)
    left its blocks, with stale contents, in the cache."""
    a, b = _compact(1).set_backend(path), _compact(2).set_backend(path)
    inp = example_inputs(a, batch=32, seq=64)  # activations of 32 x 64 x d float64 > 64 KiB
    with torch.inference_mode():
        env.setenv("COFI_WORKSPACE", "0")
        want_a, want_b = a(*inp, output_hidden_states=True), b(*inp).logits
        env.delenv("COFI_WORKSPACE")
        first = a(*inp, output_hidden_states=True)
        del first
        before = workspace.stats()
        again = a(*inp, output_hidden_states=True)
        after = workspace.stats()
        got_b = b(*inp).logits
    assert after.hits > before.hits, (before, after)
    assert after.misses == before.misses, "a repeated call must not need new blocks"
    assert a.last_backend == path
    torch.testing.assert_close(again.logits, want_a.logits, rtol=0, atol=0)
    for g, w in zip(again.hidden_states, want_a.hidden_states):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got_b, want_b, rtol=0, atol=0)


@needs_workspace
def test_scope_only_serves_its_thread_and_blocks_return_from_any_thread(env):
    n = BIG  # elements: 256 KiB of float32
    s0 = workspace.stats()
    outside = torch.empty(n)
    assert workspace.stats().misses == s0.misses and workspace.stats().hits == s0.hits
    seen = {}

    def other():  # another thread allocating while the main thread is inside a scope
        seen["t"] = torch.empty(n)
        seen["stats"] = workspace.stats()

    with workspace.scope():
        t = torch.empty(n)
        s1 = workspace.stats()
        th = threading.Thread(target=other)
        th.start()
        th.join()
        small = torch.empty(16)
    assert s1.hits + s1.misses == s0.hits + s0.misses + 1 and s1.in_use_bytes >= n * 4
    assert seen["stats"].hits + seen["stats"].misses == s1.hits + s1.misses, "other threads are not served"
    assert workspace.stats().hits + workspace.stats().misses == s1.hits + s1.misses, "small ones are not served"
    cached = workspace.stats().cached_bytes
    holder = [t]  # the last reference, dropped on another thread
    del t
    freer = threading.Thread(target=holder.clear)
    freer.start()
    freer.join()
    assert workspace.stats().cached_bytes >= cached + n * 4, "a block freed on another thread goes back"
    del outside, small, seen


@needs_workspace
def test_cap_release_and_off_switch(env):
    workspace.release()
    assert workspace.stats().cached_bytes == 0
    with workspace.scope():
        t = torch.empty(BIG)
    del t
    assert workspace.stats().cached_bytes >= 4 * BIG
    assert workspace.release() >= 4 * BIG and workspace.stats().cached_bytes == 0
    env.setenv("COFI_WORKSPACE_MB", "0")  # cap 0: freed blocks go back to the OS
    with workspace.scope():
        t = torch.empty(BIG)
    del t
    assert workspace.stats().cached_bytes == 0
    env.setenv("COFI_WORKSPACE", "0")  # off: nothing is served
    s0 = workspace.stats()
    with workspace.scope():
        t = torch.empty(BIG)
    assert workspace.stats().in_use_bytes == s0.in_use_bytes
    del t


@needs_workspace
def test_past_the_cap_the_least_recently_freed_blocks_go(env):
    workspace.release()
    env.setenv("COFI_WORKSPACE_MB", "1")
    with workspace.scope():
        old = torch.empty(512 * 1024 // 4)  # 512 KiB
        new = torch.empty(768 * 1024 // 4)  # 768 KiB
    del old
    assert workspace.stats().cached_bytes == 512 * 1024
    del new  # 1.25 MiB cached > 1 MiB: the older block is dropped, the one just freed stays
    assert workspace.stats().cached_bytes == 768 * 1024
    s = workspace.stats()
    with workspace.scope():
        again = torch.empty(768 * 1024 // 4)
    assert workspace.stats().hits == s.hits + 1 and workspace.stats().cached_bytes == 0
    del again
    workspace.release()


def test_scope_is_a_no_op_off_cpu_and_nests():
    with workspace.scope("meta"):
        assert torch.empty(BIG, device="meta").device.type == "meta"
    if workspace.available():
        with workspace.scope():
            with workspace.scope():
                pass
            s = workspace.stats()
            t = torch.empty(BIG)
            assert workspace.stats().hits + workspace.stats().misses == s.hits + s.misses + 1, "outer scope still on"
            del t
