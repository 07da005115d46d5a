"""cofi.bench.harness.time_interleaved's percentiles stay within the samples."""
from __future__ import annotations

import itertools

from cofi.bench import harness


def test_time_interleaved_percentiles_within_samples(monkeypatch) -> None:
    # three rounds of 100, 150, 900 ms: the "exclusive" quantile method put p10 at 70 ms (below
    # every sample; with a wider spread it went negative)
    clock = itertools.accumulate(itertools.cycle([0.0, 0.1, 0.0, 0.15, 0.0, 0.9]))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    got = harness.time_interleaved({"a": lambda: None}, rounds=3, warmup=0)["a"]
    assert 100 - 1e-9 <= got["p10_ms"] <= got["p50_ms"] <= got["p90_ms"] <= 900 + 1e-9
    assert abs(got["p50_ms"] - 150) < 1e-9 and got["n"] == 3
