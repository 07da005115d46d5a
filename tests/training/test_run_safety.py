"""No silent wrong answer, no lost run, no code execution from a file (cofi.training).

A planted checkpoint whose unpickling would run code is refused, never run; a re-used output
folder is refused without --resume / --overwrite; a second run in a locked folder is refused;
--resume refuses another configuration and honours --skip-compact; the metrics log keeps only
steps the resumed state reached; the pruning summary survives a resume in stage 2; a failed
checkpoint write (full disk) leaves no temp file and the run resumes to the uninterrupted result;
a step whose sampled hidden mask keeps nothing trains in compact mode as in dense mode; two
data-parallel processes killed and resumed end bitwise equal to an uninterrupted pair (every
rank's own dropout stream is in the checkpoint).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _hooks import KillAt, run
from _tiny import base_args
from test_training import PRUNE, _ddp_child, _forked, _prune_args, _read_jsonl, _weights

KW = dict(target_sparsity=0.5, max_steps=40, lagrangian_warmup_steps=10, save_steps=10, eval_steps=10,
          logging_steps=5, compact_max_steps=12, compact_batch_size=16, dropout=0.1)


@pytest.fixture(scope="module")
def ref(tiny):
    """An uninterrupted run with KW (prune + compact)."""
    from cofi.cli import main

    out = tiny["root"] / "safety_ref"
    assert main(_prune_args(tiny, out, **KW)) == 0
    return out


def _kill_at(args, stage, step):
    sys.exit(run(args, [KillAt(stage, step)]))


def _same_run(a: Path, b: Path) -> None:
    """Bitwise-equal outputs and metrics log."""
    for sub in ("final", "best", "compact"):
        assert (a / sub).exists() == (b / sub).exists(), sub
        if (a / sub).exists():
            wa, wb = _weights(a / sub), _weights(b / sub)
            assert wa.keys() == wb.keys()
            assert all(torch.equal(wa[k], wb[k]) for k in wa), sub
    assert _read_jsonl(a / "metrics.jsonl") == _read_jsonl(b / "metrics.jsonl")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r["compact"].pop("dir", None)
    assert ra == rb


def _err_line(capsys) -> str:
    """The one-line error (other stderr lines are progress bars of model loading)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert len(lines) == 1, err
    return lines[0]


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _plant(path: Path, obj) -> None:
    torch.save(obj, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())


class TestNoCodeExecution:
    def test_planted_checkpoint_is_not_unpickled(self, tiny, ref, tmp_path, capsys):
        from cofi.cli import main

        out = tmp_path / "run"
        shutil.copytree(ref, out)
        marker = tmp_path / "marker"
        ck = out / "checkpoints"
        _plant(ck / "ckpt-9-99999999.pt", {"stage": "compact", "x": _Payload(marker)})
        _plant(ck / "ckpt-2-00000099.pt", _Payload(marker))
        with pytest.warns(RuntimeWarning, match="refused to unpickle"):
            rc = main(_prune_args(tiny, out, **KW) + ["--resume"])
        assert rc == 0 and not marker.exists()
        assert "refused to unpickle" in capsys.readouterr().out
        # the planted files are set aside, not deleted, and never sort newer again
        assert (ck / "ckpt-9-99999999.pt.rejected").exists() and not (ck / "ckpt-9-99999999.pt").exists()
        _same_run(ref, out)

    def test_malformed_state_falls_back(self, tiny, ref, tmp_path):
        from cofi.training import checkpoint as C

        out = tmp_path / "run"
        shutil.copytree(ref, out)
        ck = C.list_checkpoints(out / "checkpoints")
        good = C.read_checkpoint(ck[-1])
        bad = dict(good, loop=dict(good["loop"], step="7"))
        _plant(out / "checkpoints" / "ckpt-2-00000013.pt", bad)
        # a state whose step does not match its name: a renamed older checkpoint
        _plant(out / "checkpoints" / "ckpt-2-00000014.pt", good)
        with pytest.warns(RuntimeWarning, match="malformed"):
            path, st = C.load_latest(out / "checkpoints", log=lambda m: None)
        assert path == ck[-1]


class TestOutputFolder:
    def test_reused_folder_is_refused_and_overwrite_starts_afresh(self, tiny, ref, tmp_path, capsys):
        from cofi.cli import main

        out = tmp_path / "run"
        shutil.copytree(ref, out)
        kw = dict(KW, learning_rate=2e-3)  # another run in the same folder
        assert main(_prune_args(tiny, out, **kw)) == 2
        err = _err_line(capsys)
        assert str(out) in err and "--resume" in err and "--overwrite" in err
        (out / "notes.txt").write_text("mine")
        assert main(_prune_args(tiny, out, **kw) + ["--overwrite"]) == 0
        assert (out / "notes.txt").read_text() == "mine"  # only cofi's outputs are deleted
        fresh = tmp_path / "fresh"
        assert main(_prune_args(tiny, fresh, **kw)) == 0
        _same_run(fresh, out)
        from cofi.training import checkpoint as C

        assert [p.name for p in C.list_checkpoints(out / "checkpoints")] == \
            [p.name for p in C.list_checkpoints(fresh / "checkpoints")]

    def test_second_run_in_a_locked_folder_is_refused(self, tiny, tmp_path, capsys):
        from cofi.cli import main

        out = tmp_path / "run"
        out.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(out / '.cofi.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'4242')\nprint('locked', flush=True)\ntime.sleep(120)\n")],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            for extra in ([], ["--resume"], ["--overwrite"]):
                assert main(_prune_args(tiny, out, **KW) + extra) == 2
                err = _err_line(capsys)
                assert "in use by another run" in err and str(out) in err
        finally:
            holder.kill()
            holder.wait()
        assert sorted(p.name for p in out.iterdir()) == [".cofi.lock"]  # nothing was written


class TestResume:
    def test_changed_config_is_refused(self, tiny, ref, tmp_path, capsys):
        from cofi.cli import main

        out = tmp_path / "run"
        shutil.copytree(ref, out)
        assert main(_prune_args(tiny, out, **dict(KW, learning_rate=2e-3, seed=5)) + ["--resume"]) == 2
        err = _err_line(capsys)
        assert "learning_rate" in err and "seed" in err and "different configuration" in err

    def test_kill_in_compact_stage_keeps_prune_summary_and_honours_skip_compact(self, tiny, ref, tmp_path):
        from cofi.cli import main

        out = tmp_path / "run"
        assert _forked(_kill_at, _prune_args(tiny, out, **KW), "compact", 11) == -9  # after the step-10 checkpoint
        skip = tmp_path / "skip"
        shutil.copytree(out, skip)
        assert main(_prune_args(tiny, out, **KW) + ["--resume"]) == 0
        _same_run(ref, out)
        want = json.loads((ref / "results.json").read_text())["prune"]
        assert want is not None and json.loads((out / "results.json").read_text())["prune"] == want

        before = sorted(p.name for p in (skip / "checkpoints").iterdir())
        assert main(_prune_args(tiny, skip, **KW) + ["--resume", "--skip-compact", "true"]) == 0
        res = json.loads((skip / "results.json").read_text())
        assert res["prune"] == want and res["compact"] is None
        assert sorted(p.name for p in (skip / "checkpoints").iterdir()) == before  # no compact step ran

    @pytest.mark.parametrize("stage,step", [("prune", 7), ("compact", 7)])
    def test_kill_before_a_checkpoint_leaves_no_records_of_the_lost_steps(self, tiny, ref, tmp_path, stage, step):
        from cofi.cli import main

        out = tmp_path / "run"
        assert _forked(_kill_at, _prune_args(tiny, out, **KW), stage, step) == -9
        assert any(r["step"] == 5 and r.get("stage") == stage for r in _read_jsonl(out / "metrics.jsonl"))
        assert main(_prune_args(tiny, out, **KW) + ["--resume"]) == 0
        _same_run(ref, out)

    def test_full_disk_at_a_checkpoint_then_resume(self, tiny, ref, tmp_path, monkeypatch, capsys):
        from cofi.cli import main

        out = tmp_path / "run"
        real = os.fsync

        def full_disk(fd):
            if "ckpt-1-00000020.pt.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)

        monkeypatch.setattr(os, "fsync", full_disk)
        assert main(_prune_args(tiny, out, **KW)) == 2
        err = _err_line(capsys)
        assert "no space left on device" in err and "ckpt-1-00000020.pt" in err
        monkeypatch.setattr(os, "fsync", real)
        ck = out / "checkpoints"
        assert sorted(p.name for p in ck.iterdir()) == ["ckpt-1-00000010.pt", "ckpt-1-00000010.pt.sha256"]
        # temp files another failed write (or a kill) left behind do not stop the recovery
        (ck / ".ckpt-1-00000030.pt.tmp-99999").write_bytes(b"\0" * 100)
        (out / ".metrics.jsonl.tmp-99999").write_bytes(b"{")
        assert main(_prune_args(tiny, out, **KW) + ["--resume"]) == 0
        _same_run(ref, out)
        assert not list(ck.glob(".*tmp*")) and not list(out.glob(".*tmp*"))


class TestZeroHiddenMask:
    @staticmethod
    def _zero_hidden_between(monkeypatch, lo: int, hi: int) -> None:
        """Sampled hidden masks keep nothing from the lo-th to the hi-th mask step of a run."""
        from cofi.masks import MaskSet

        monkeypatch.undo()
        orig = MaskSet.step
        count = {"n": 0}

        def step(self, *a, **k):
            r = orig(self, *a, **k)
            count["n"] += 1
            if lo <= count["n"] <= hi:
                r.z.hidden = r.z.hidden * 0
            return r

        monkeypatch.setattr(MaskSet, "step", step)

    def test_compact_trains_like_dense_and_resumes(self, tiny, tmp_path, monkeypatch):
        from cofi.cli import main

        kw = dict(target_sparsity=0.5, max_steps=30, lagrangian_warmup_steps=10, save_steps=10, eval_steps=10,
                  skip_compact="true", mask_groups="hidden,head,intermediate")
        outs = {}
        for mode in ("compact", "dense"):
            self._zero_hidden_between(monkeypatch, 3, 9)
            outs[mode] = tmp_path / mode
            assert main(_prune_args(tiny, outs[mode], backend=mode, **kw)) == 0
        a, b = _weights(outs["compact"] / "final"), _weights(outs["dense"] / "final")
        for k in a:  # float32 GEMMs on gathered vs full weights: rounding only
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
        ra, rb = (_read_jsonl(outs[m] / "metrics.jsonl") for m in ("compact", "dense"))
        la = [r["loss"] for r in ra if "loss" in r]
        lb = [r["loss"] for r in rb if "loss" in r]
        assert la == pytest.approx(lb, rel=1e-4)
        # killed inside the zero-hidden window, resumed: the same weights as without the kill
        killed = tmp_path / "killed"
        self._zero_hidden_between(monkeypatch, 3, 9)
        assert _forked(_kill_at, _prune_args(tiny, killed, backend="compact", **kw), "prune", 22) == -9
        self._zero_hidden_between(monkeypatch, 3 - 4, 9 - 4)  # the resume redoes mask steps 5.. of the run
        assert main(_prune_args(tiny, killed, backend="compact", **kw) + ["--resume"]) == 0
        c = _weights(killed / "final")
        assert all(torch.equal(a[k], c[k]) for k in a)

    def test_final_masks_without_hidden_dims_stop_before_the_compact_stage(self, tiny, tmp_path, monkeypatch, capsys):
        from cofi.cli import main
        from cofi.training import prune

        orig = prune.delivered_masks

        def no_hidden(*a, **k):  # the masks the pruning stage delivers
            m, info = orig(*a, **k)
            m.hidden = torch.zeros_like(m.hidden)
            return m, info

        monkeypatch.setattr(prune, "delivered_masks", no_hidden)
        out = tmp_path / "run"
        assert main(_prune_args(tiny, out, **dict(KW, max_steps=20))) == 2
        err = _err_line(capsys)
        assert "keep no hidden dimension" in err and "--skip-compact" in err
        res = json.loads((out / "results.json").read_text())
        assert res["prune"]["steps"] == 20 and res["compact"] is None


def _ddp_kill_child(rank, world, port, args, step):
    _ddp_child(rank, world, port, args, [KillAt("prune", step)])


def _two_processes(target, args, *extra) -> list[int]:
    import multiprocessing as mp
    import socket

    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    procs = [mp.get_context("fork").Process(target=target, args=(r, 2, port, args, *extra)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    return [p.exitcode for p in procs]


def test_two_process_kill_and_resume_is_bitwise(tiny, tmp_path):
    """Dropout on: rank 1 draws from its own stream; a resume must restore it, not rank 0's."""
    kw = dict(target_sparsity=0.5, max_steps=24, prepruning_steps=4, lagrangian_warmup_steps=8, eval_steps=8,
              save_steps=8, skip_compact="true", dropout=0.1)

    def args(out):
        return ["prune"] + base_args(tiny["model"], tiny["train"], tiny["dev"], out, teacher=tiny["teacher"],
                                     **{**PRUNE, **kw})

    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert _two_processes(_ddp_child, args(ref)) == [0, 0]
    assert _two_processes(_ddp_kill_child, args(out), 13) == [-9, -9]
    assert _two_processes(_ddp_child, args(out) + ["--resume"]) == [0, 0]
    a, b = _weights(ref / "final"), _weights(out / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in ("rank0.pt", "rank1.pt"):
        x, y = torch.load(ref / r, weights_only=True), torch.load(out / r, weights_only=True)
        assert all(torch.equal(x["maskset"][k], y["maskset"][k]) for k in x["maskset"])
