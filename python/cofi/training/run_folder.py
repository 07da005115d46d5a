"""The run's output folder: locked for the run (``.cofi.lock``, flock by rank 0); a folder holding
anything is refused unless ``--resume`` (continue the run in it) or ``--overwrite`` (delete what
a cofi run wrote there first). ``--resume`` takes the newest checkpoint that verifies, loads as
plain data and fits this run; one of another configuration (in a key that changes results) or
command is refused."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import checkpoint as C
from . import distributed as dd
from ..errors import UserError
from .config import TrainConfig, upgrade_saved_config
from .metrics_log import JsonlLog
from .state import check_train_state

LOCK = ".cofi.lock"
# What a run writes in its output folder (``--overwrite`` deletes these and nothing else).
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "results.json", "budget.json", "checkpoints", "best", "final", "compact",
               "compact_folded")
# Config keys that do not change what a run computes: they may differ on --resume.
RESUME_FREE = frozenset({"output_dir", "progress", "num_threads", "device", "keep_checkpoints", "save_steps",
                         "logging_steps", "skip_compact", "overwrite"})


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key that changes what the run computes (a key the
    saved config lacks counts as its default)."""
    defaults = TrainConfig().to_dict()
    saved = upgrade_saved_config(saved)
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in RESUME_FREE:
            continue
        a, b = saved.get(k, defaults.get(k)), current.get(k, defaults.get(k))
        if a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


class RunFolder:
    """``cfg.output_dir`` for one run: ``claim()`` it (lock + checks), ``find_resume()`` the state to
    continue from, ``release()`` the lock at the end."""

    def __init__(self, cfg: TrainConfig, command: str, resume: bool, dist: dd.DistInfo, device: torch.device,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.command, self.resume, self.dist, self.device, self.log = cfg, command, resume, dist, device, log
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lock and overwrite checks
    def claim(self) -> None:
        """Rank 0 locks the output folder for the run (a second run there is refused), refuses
        a previous run's outputs unless resuming or ``overwrite`` (which deletes them) and removes
        temp files of failed writes; every rank learns whether that worked."""
        err: UserError | None = None
        if self.dist.main:
            try:
                self._lock_and_check()
            except UserError as e:
                err = e
        if not dd.all_true(err is None, self.dist, self.device):
            self.release()
            raise err if err is not None else UserError(
                f"cofi: rank 0 refused the output folder {self.out} (see its error)")

    def _lock_and_check(self) -> None:
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            ran_here = (out / LOCK).exists()  # a cofi run used this folder before
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cofi: cannot use output folder {out}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"cofi: output folder {out} is in use by another run (pid {holder or '?'}); "
                            "wait for it to finish or choose another --output-dir") from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if present and not self.resume:
            if not self.cfg.overwrite:
                shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
                raise UserError(f"cofi: output folder {out} is not empty ({shown}); pass --resume to continue the "
                                "run in it or --overwrite to delete its outputs and start afresh")
            self._delete_outputs(present, ran_here)
        stale = C.clean_temp_files(out) + C.clean_temp_files(self.ckpt_dir)
        if stale:
            self.log(f"cofi: removed {len(stale)} temp file(s) of interrupted writes: {', '.join(p.name for p in stale)}")

    def _delete_outputs(self, present: list[str], ran_here: bool) -> None:
        """``--overwrite``: delete what a cofi run wrote (only if one used the folder), keep the rest."""
        out = self.out
        gone = [n for n in present if n in RUN_OUTPUTS or (n.startswith("rank") and n.endswith(".pt"))
                or C.is_temp_name(n)]
        if gone and not ran_here:
            raise UserError(f"cofi: --overwrite: output folder {out} holds {', '.join(gone[:4])} but no cofi run "
                            f"used it ({LOCK} is missing); delete them yourself or choose another --output-dir")
        for n in gone:
            p = out / n
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        kept = sorted(set(present) - set(gone))
        if gone:
            self.log(f"cofi: --overwrite: deleted the previous run's outputs in {out} ({', '.join(gone)})")
        if kept:
            self.log(f"cofi: --overwrite: kept {', '.join(kept)} in {out} (not written by cofi)")

    def release(self) -> None:
        """Give up the output folder's lock (the lock file stays; it is not part of the run)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ resume checks
    def saved_config(self) -> dict:
        """The run's config as config.yaml and checkpoints hold it (``overwrite`` is not part of a run)."""
        return {k: v for k, v in self.cfg.to_dict().items() if k != "overwrite"}

    def save_config(self) -> None:
        if self.dist.main:
            C.atomic_write_bytes(self.out / "config.yaml", yaml.safe_dump(self.saved_config(), sort_keys=False).encode())

    def _saved_config_diff(self) -> list[str]:
        """config_diff against the folder's config.yaml (none: nothing to compare)."""
        p = self.out / "config.yaml"
        try:
            saved = yaml.safe_load(p.read_text()) if p.is_file() else None
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            saved = None
        if not isinstance(saved, dict):
            return []
        return config_diff(saved, self.cfg.to_dict())

    def _check_state(self, path: Path, st: dict, shapes_of: Callable[[str | None], dict]) -> str | None:
        """Why a loaded checkpoint cannot be this run's (None = it can): its keys and types, and
        the shapes of the weights it would load into the models built so far. A checkpoint of
        another command's run is not skipped but refused (CheckpointError): the folder is not
        this run's."""
        allowed = ("finetune",) if self.command == "finetune" else ("prune", "compact")
        if st["stage"] not in allowed:
            raise C.CheckpointError(f"cofi: --resume: {self.out} holds a `cofi {'finetune' if st['stage'] == 'finetune' else 'prune'}` "
                                    f"run (checkpoint {path.name}), not a `cofi {self.command}` one; choose another --output-dir")
        return check_train_state(st, shapes_of(st.get("stage")))

    def find_resume(self, shapes_of: Callable[[str | None], dict], metrics: JsonlLog) -> dict | None:
        """The state to resume from (None: start from scratch). Refuses a checkpoint of a run
        with a different configuration; checkpoints newer than the one used are set aside; the
        metrics log keeps only the records of steps the returned state has reached.
        ``shapes_of(stage)``: the tensor shapes a checkpoint of that stage must have."""
        state = None
        if self.resume:
            got = C.load_latest(self.ckpt_dir, log=self.log, check=lambda p, st: self._check_state(p, st, shapes_of))
            if got is None:
                diff = self._saved_config_diff()
                if diff:
                    raise C.CheckpointError(
                        f"cofi: --resume: no usable checkpoint in {self.ckpt_dir}, and {self.out / 'config.yaml'} is of a "
                        f"run with a different configuration ({'; '.join(diff)}); pass --overwrite to start afresh")
                self.log(f"cofi: --resume: no usable checkpoint in {self.ckpt_dir}; starting from scratch")
            else:
                path, state = got
                diff = config_diff(state["config"], self.cfg.to_dict())
                if diff:
                    raise C.CheckpointError(
                        f"cofi: --resume: checkpoint {path} is of a run with a different configuration "
                        f"({'; '.join(diff)}); resume with the same settings, or pass --overwrite to start afresh")
                self.log(f"cofi: resuming from {path} (stage {state['stage']}, step {state['loop']['step']})")
            dd.barrier(self.dist)
            if self.dist.main:
                for p in C.reject_newer(self.ckpt_dir, got[0] if got is not None else None):
                    self.log(f"cofi: set aside unusable checkpoint {p} as {p.name}{C.REJECTED}")
        if state is None:
            metrics.truncate_after(-1, 0)  # a fresh start: no record of an earlier attempt survives
        self.save_config()
        dd.barrier(self.dist)
        return state
