"""Atomic, verified checkpoints: write to a temp file, fsync, rename; a sha256 sidecar detects
truncation and corruption; loading falls back to the previous good checkpoint (and says so).

Layout in ``<output_dir>/checkpoints/``: ``ckpt-<stage>-<step:08d>.pt`` + ``.pt.sha256``.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

_NAME = re.compile(r"^ckpt-(\d+)-(\d{8})\.pt$")


class CheckpointError(UserError):
    pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(directory: str | Path, stage_index: int, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Serialise ``state`` atomically; keep the newest ``keep`` checkpoints."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = d / f"ckpt-{stage_index}-{step:08d}.pt"
    # the sidecar is written first: a checkpoint without a matching sidecar is never trusted
    atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    atomic_write_bytes(path, data)
    for old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        for p in (old, old.with_name(old.name + ".sha256")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in (stage, step) order, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


def verify(path: Path) -> str | None:
    """None if the file matches its sha256 sidecar, else the reason it does not."""
    side = path.with_name(path.name + ".sha256")
    if not side.exists():
        return "no .sha256 sidecar"
    want = side.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    got = h.hexdigest()
    return None if got == want else f"sha256 mismatch (file {got[:12]}..., recorded {want[:12]}...)"


def load_latest(directory: str | Path, log=print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies and loads; corrupted ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        why = verify(path)
        if why is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
                return path, state
            except Exception as e:  # noqa: BLE001 - any unreadable file is "corrupted"
                why = f"unreadable ({type(e).__name__}: {e})"
        msg = f"cofi: checkpoint {path} is corrupted or truncated: {why}; falling back to the previous one"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log(msg)
    return None


# ---------------------------------------------------------------------- RNG state
def rng_state(mask_generator: torch.Generator | None) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if mask_generator is not None:
        st["mask_generator"] = mask_generator.get_state()
    return st


def set_rng_state(st: dict[str, Any], mask_generator: torch.Generator | None) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if mask_generator is not None and "mask_generator" in st:
        mask_generator.set_state(st["mask_generator"])
