"""Property tests of the checkpoint folder format (cofi.training.checkpoint).

Random states round-trip exactly (tensors of every dtype and shape, plain data, RNG states).
Random damage to a folder of good checkpoints (truncation, byte flips, wrong / missing / junk
sidecars, planted files with odd names, code-running payloads with matching sidecars, files whose
content does not match their name, temp files, junk, failed writes on a full disk) always yields
the newest undamaged checkpoint with exactly its state, or None, each skipped file with a message;
never another state, never an exception, never an unpickled payload.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cofi.training import checkpoint as C

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
STAGE_NAMES = {v: k for k, v in C.STAGES.items()}

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 100
    if dtype == torch.bool:
        t = t > 0
    t = t.to(dtype)
    if draw(st.booleans()) and t.dim() >= 2 and t.shape[0] > 1:
        t = t.transpose(0, 1)  # non-contiguous views round-trip too
    return t


plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
payloads = st.recursive(
    plain | tensors(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8)


def _rng(seed: int) -> dict:
    """An RNG state in the checkpoint format, as rng_state() writes it, from seeded generators."""
    kind, keys, pos, has_gauss, cached = np.random.RandomState(seed).get_state()
    version, internal, gauss = random.Random(seed).getstate()
    return {"torch": torch.Generator().manual_seed(seed).get_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": (version, internal, gauss),
            "mask_generator": torch.Generator().manual_seed(seed + 1).get_state()}


def _state(stage: int, step: int, payload, seed: int) -> dict:
    return {"stage": STAGE_NAMES[stage], "loop": {"step": step}, "rng": _rng(seed), "payload": payload}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _load(d: Path, log: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return C.load_latest(d, log=log.append)


@settings(max_examples=40, **SETTINGS)
@given(stage=st.integers(0, 2), step=st.integers(0, 10 ** 8 - 1), payload=payloads, seed=st.integers(0, 2 ** 31))
def test_states_round_trip_exactly(stage, step, payload, seed):
    state = _state(stage, step, payload, seed)
    with tempfile.TemporaryDirectory() as t:
        path = C.save_checkpoint(t, stage, step, state)
        log: list[str] = []
        got = _load(Path(t), log)
        assert got is not None and got[0] == path and not log
        assert _same(state, got[1])
        assert sorted(p.name for p in Path(t).iterdir()) == [path.name, path.name + ".sha256"]


def test_rng_state_round_trip_restores_every_generator():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(4)
    np.random.standard_normal()  # a cached gaussian in the numpy state
    random.gauss(0, 1)
    with tempfile.TemporaryDirectory() as t:
        C.save_checkpoint(t, 1, 5, {"stage": "prune", "loop": {"step": 5}, "rng": C.rng_state(gen)})
        want = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)],
                torch.rand(3, generator=gen))
        torch.manual_seed(99)
        np.random.seed(99)
        random.seed(99)
        gen.manual_seed(99)
        _, state = C.load_latest(t)
        C.set_rng_state(state["rng"], gen)
        got = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)],
               torch.rand(3, generator=gen))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
    assert torch.equal(want[3], got[3])


class _Exec:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _sidecar(p: Path) -> None:
    side = p.with_name(p.name + ".sha256")
    if not side.is_dir():
        side.write_text(hashlib.sha256(p.read_bytes()).hexdigest())


DAMAGE = ["truncate", "flip", "sidecar_wrong", "sidecar_garbage", "sidecar_missing", "sidecar_dir", "plant_exec",
          "plant_random", "plant_plain_wrong", "plant_renamed", "plant_symlink", "plant_dir", "tmp_file", "junk",
          "failed_write"]


@settings(max_examples=60, **SETTINGS)
@given(keys=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 60)), unique=True, max_size=4),
       damage=st.lists(st.tuples(st.sampled_from(DAMAGE), st.integers(0, 10 ** 6), st.integers(0, 2),
                                 st.integers(0, 99)), max_size=5),
       seed=st.integers(0, 1000))
def test_damage_yields_the_newest_good_checkpoint_or_none(keys, damage, seed):
    keys = sorted(keys)
    with tempfile.TemporaryDirectory() as t:
        d = Path(t) / "checkpoints"
        marker = Path(t) / "marker"
        states, digests = {}, {}
        for i, (stage, step) in enumerate(keys):
            states[(stage, step)] = _state(stage, step, {"w": torch.full((3,), float(i)), "i": i}, seed + i)
            p = C.save_checkpoint(d, stage, step, states[(stage, step)], keep=100)
            digests[p.name] = (p.read_bytes(), hashlib.sha256(p.read_bytes()).hexdigest())
        d.mkdir(exist_ok=True)
        names = [f"ckpt-{s}-{n:08d}.pt" for s, n in keys]
        for kind, r, stage, step in damage:
            target = d / names[r % len(names)] if names else None
            new = d / f"ckpt-{stage}-{step:08d}.pt"
            if kind == "truncate" and target is not None and target.is_file():
                data = target.read_bytes()
                target.write_bytes(data[: r % max(1, len(data))])
            elif kind == "flip" and target is not None and target.is_file():
                data = bytearray(target.read_bytes())
                if data:
                    data[r % len(data)] ^= 1 + r % 255
                    target.write_bytes(bytes(data))
            elif kind.startswith("sidecar") and target is not None:
                side = target.with_name(target.name + ".sha256")
                if side.is_dir():
                    continue
                if kind == "sidecar_wrong":
                    side.write_text(hashlib.sha256(str(r).encode()).hexdigest())
                elif kind == "sidecar_garbage":
                    side.write_bytes(bytes([r % 256, 0xFF, 0xFE]) * 5)
                elif kind == "sidecar_missing" and side.exists():
                    side.unlink()
                elif kind == "sidecar_dir":
                    if side.exists():
                        side.unlink()
                    side.mkdir()
            elif kind == "plant_exec" and not new.is_dir():
                torch.save({"stage": STAGE_NAMES[stage], "loop": {"step": step}, "x": _Exec(str(marker))}, new)
                _sidecar(new)
            elif kind == "plant_random" and not new.is_dir():
                new.write_bytes(random.Random(r).randbytes(r % 3000))
                _sidecar(new)
            elif kind == "plant_plain_wrong" and not new.is_dir():
                bad = [[1, 2], {"stage": "prune"}, {"stage": STAGE_NAMES[stage], "loop": {"step": str(step)}},
                       {"stage": STAGE_NAMES[stage], "loop": {"step": step}, "rng": {"torch": torch.zeros(3)}}]
                torch.save(bad[r % len(bad)], new)
                _sidecar(new)
            elif kind == "plant_renamed" and target is not None and target.is_file() and not new.is_dir() \
                    and new != target:
                # a real checkpoint under another checkpoint's name (its state says otherwise)
                new.write_bytes(target.read_bytes())
                _sidecar(new)
            elif kind == "plant_symlink" and target is not None and new != target and not new.exists():
                new.symlink_to(target)
                side = target.with_name(target.name + ".sha256")
                if side.is_file() and not new.with_name(new.name + ".sha256").is_dir():
                    new.with_name(new.name + ".sha256").write_bytes(side.read_bytes())
            elif kind == "plant_dir" and not new.exists():
                new.mkdir()
            elif kind == "tmp_file":
                (d / f".{new.name}.tmp-{r}").write_bytes(b"\0" * (r % 500))
            elif kind == "junk":
                odd = ["ckpt-1-1.pt", f"ckpt-{stage}-{step:08d}.pt.bak", "CKPT-1-00000001.PT", "ckpt-x-00000001.pt",
                       f"ckpt-{stage}-{step:09d}.pt", "ckpt-1-00000001.pt ", "\u00e9t\u00e9.pt", "..pt", "-", ".sha256"]
                (d / odd[r % len(odd)]).write_bytes(random.Random(r).randbytes(r % 100))
            elif kind == "failed_write" and not new.is_dir() and not (d / (new.name + ".sha256")).is_dir():
                calls = {"n": 0}
                real = os.fsync

                def full(fd, _n=r % 3):
                    calls["n"] += 1
                    if calls["n"] > _n:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return real(fd)

                s = _state(stage, step, {"w": torch.zeros(2)}, seed)
                with mock.patch.object(os, "fsync", full):
                    try:
                        p = C.save_checkpoint(d, stage, step, s, keep=100)
                    except C.CheckpointError as e:
                        assert "no space left" in str(e)
                    else:  # the failure hit only the directory fsync: the write is complete
                        states[(stage, step)] = s
                        digests[p.name] = (p.read_bytes(), hashlib.sha256(p.read_bytes()).hexdigest())
                        if p.name not in names:
                            names.append(p.name)
                assert not [q for q in d.iterdir() if ".tmp-" in q.name and q.name.startswith(f".{new.name}")]

        def intact(name: str) -> bool:
            p, side = d / name, d / (name + ".sha256")
            if name not in digests or p.is_symlink() or not p.is_file() or not side.is_file():
                return False
            data, digest = digests[name]
            return p.read_bytes() == data and side.read_bytes().decode(errors="replace").strip() == digest

        good = sorted((C.parse_name(n), n) for n in digests if intact(n))
        log: list[str] = []
        got = _load(d, log)
        assert not marker.exists(), "a planted payload ran"
        if not good:
            assert got is None
        else:
            key, name = good[-1]
            assert got is not None and got[0].name == name
            assert _same(states[key], got[1])
        # every checkpoint-named file newer than the one returned was reported
        newer = [p for p in C.list_checkpoints(d) if got is None or C.parse_name(p) > C.parse_name(got[0])]
        assert len(log) == len(newer) and all("falling back" in m for m in log)
        C.clean_temp_files(d)
        assert not [q for q in d.iterdir() if ".tmp-" in q.name and q.name.startswith(".")]


def test_reject_newer_sets_aside_only_newer_files():
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        for s, n in ((1, 10), (1, 20), (2, 5)):
            C.save_checkpoint(d, s, n, _state(s, n, None, 0), keep=10)
        gone = C.reject_newer(d, d / "ckpt-1-00000010.pt")
        assert [p.name for p in gone] == ["ckpt-1-00000020.pt", "ckpt-2-00000005.pt"]
        assert [p.name for p in C.list_checkpoints(d)] == ["ckpt-1-00000010.pt"]
        assert (d / "ckpt-2-00000005.pt.rejected").exists() and (d / "ckpt-2-00000005.pt.sha256.rejected").exists()
        C.save_checkpoint(d, 1, 15, _state(1, 15, None, 0), keep=1)
        assert [p.name for p in C.list_checkpoints(d)] == ["ckpt-1-00000015.pt"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_write_leaves_no_temp_file_and_keeps_the_old_checkpoints(fail_at):
    with tempfile.TemporaryDirectory() as t:
        d = Path(t)
        C.save_checkpoint(d, 1, 10, _state(1, 10, {"a": torch.ones(2)}, 0))
        before = {p.name: p.read_bytes() for p in d.iterdir()}
        real, calls = os.fsync, {"n": 0}

        def full(fd):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)

        with mock.patch.object(os, "fsync", full), pytest.raises(C.CheckpointError, match="no space left on device"):
            C.save_checkpoint(d, 1, 20, _state(1, 20, {"a": torch.zeros(2)}, 0))
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
        assert C.load_latest(d, log=lambda m: None)[0].name == "ckpt-1-00000010.pt"
