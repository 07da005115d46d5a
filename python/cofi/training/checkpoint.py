"""Atomic, verified checkpoints: write to a temp file, fsync, rename; a sha256 sidecar detects
truncation and corruption; loading falls back to the previous good checkpoint (and says so).

Layout in ``<output_dir>/checkpoints/``: ``ckpt-<stage>-<step:08d>.pt`` + ``.pt.sha256``.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool,
None; the RNG states included), and is read with ``torch.load(weights_only=True)``: a file that
needs anything else to load is refused, never unpickled. The sidecar only detects accidents (a
forger writes a matching one), so the loaded state's structure is checked too before it is used.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError, first_line

_NAME = re.compile(r"ckpt-([0-9]+)-([0-9]{8})\.pt")
# atomic_write_bytes' temp files: ".<name>.tmp-<pid>"
_TMP = re.compile(r"\..+\.tmp-[0-9]+", re.DOTALL)
REJECTED = ".rejected"


class CheckpointError(UserError):
    pass


def _fsync_dir(d: Path) -> None:
    """Best effort: make a rename durable (the renamed file's data is already fsynced)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a fsynced temp file next to ``path``; a failed write removes it and raises."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _commit(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename; a failed write (full
    disk, ...) removes its temp file and leaves ``path`` as it was."""
    path = Path(path)
    _commit(_write_temp(path, data), path)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file name of atomic_write_bytes / save_checkpoint."""
    return _TMP.fullmatch(name) is not None


def clean_temp_files(directory: str | Path) -> list[Path]:
    """Remove temp files that a killed or failed write left in ``directory``; the caller must be
    the only writer (it holds the output folder's lock)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    gone = [p for p in d.iterdir() if _TMP.fullmatch(p.name) and p.is_file()]
    for p in gone:
        _unlink(p)
    return gone


def parse_name(path: str | Path) -> tuple[int, int] | None:
    """(stage index, step) of a checkpoint file name, or None if it is not one."""
    m = _NAME.fullmatch(Path(path).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def save_checkpoint(directory: str | Path, stage_index: int, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Serialise ``state`` atomically; keep the newest ``keep`` checkpoints (never the new one's
    predecessors before it is safely written, never the new one itself)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = d / f"ckpt-{stage_index}-{step:08d}.pt"
    side = path.with_name(path.name + ".sha256")
    try:
        # The big write goes first, to a temp file: if it fails (full disk) nothing else changed.
        # Then the sidecar, then the rename: a checkpoint without a matching sidecar is never
        # trusted, so a crash in between leaves at worst an untrusted file, never a wrong one.
        tmp = _write_temp(path, data)
        try:
            atomic_write_bytes(side, hashlib.sha256(data).hexdigest().encode())
        except BaseException:
            _unlink(tmp)
            raise
        _commit(tmp, path)
    except OSError as e:
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"cofi: cannot write checkpoint {path}: {why}; the previous checkpoints are kept") from e
    old = [p for p in list_checkpoints(d) if p != path]
    for p in old[: max(0, len(old) - (keep - 1))] if keep > 0 else []:
        _unlink(p)
        _unlink(p.with_name(p.name + ".sha256"))
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in (stage, step) order, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(k, p) for p in d.iterdir() if (k := parse_name(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


def verify(path: Path) -> str | None:
    """None if the file matches its sha256 sidecar, else the reason it does not."""
    side = path.with_name(path.name + ".sha256")
    if not side.is_file():
        return "no .sha256 sidecar"
    try:
        want = side.read_text(errors="replace").strip()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    got = h.hexdigest()
    return None if got == want else f"sha256 mismatch (file {got[:12]}..., recorded {want[:12]!r})"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` of a checkpoint with ``weights_only=True`` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(directory: str | Path, log: Callable[[str], None] = print,
                check: Callable[[Path, dict[str, Any]], str | None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, loads as plain data and passes ``check(path, state)``
    (None = fine, else the reason); every one skipped is reported, with the reason."""
    for path in reversed(list_checkpoints(directory)):
        why = verify(path)
        what = "is corrupted or truncated"
        if why is None:
            try:
                state = read_checkpoint(path)
            except pickle.UnpicklingError as e:
                what, why = "is not a plain-data checkpoint", f"refused to unpickle it ({first_line(e)})"
            except Exception as e:  # noqa: BLE001 - any unreadable file is "corrupted"
                why = f"unreadable ({type(e).__name__}: {first_line(e)})"
            else:
                why = check_common(path, state)
                if why is None and check is not None:
                    why = check(path, state)
                if why is None:
                    return path, state
                what = "is malformed"
        msg = f"cofi: checkpoint {path} {what}: {why}; falling back to the previous one"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log(msg)
    return None


def reject_newer(directory: str | Path, keep: Path | None) -> list[Path]:
    """Rename the checkpoints that sort after ``keep`` (all of them if None) and their sidecars to
    ``*.rejected``: they were skipped as unusable, and left in place they would sort newer than
    the checkpoints the resumed run writes (which the rotation would then delete)."""
    k = parse_name(keep) if keep is not None else None
    out = []
    for p in list_checkpoints(directory):
        if k is None or parse_name(p) > k:
            for q in (p, p.with_name(p.name + ".sha256")):
                if q.exists():
                    q.replace(q.with_name(q.name + REJECTED))
            out.append(p)
    return out


# ---------------------------------------------------------------------- structure checks
STAGES = {"finetune": 0, "prune": 1, "compact": 2}


def tensor_dict_problem(d: Any, name: str) -> str | None:
    """None if ``d`` maps str to tensors, else what is wrong."""
    if not isinstance(d, dict):
        return f"{name} is {type(d).__name__}, not a mapping"
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            return f"{name}[{k!r}] is {type(v).__name__}, not a tensor"
    return None


def check_common(path: Path, state: Any) -> str | None:
    """The layout every checkpoint shares: a mapping with a known stage and a step matching the
    file name, and restorable RNG states."""
    if not isinstance(state, dict):
        return f"the state is {type(state).__name__}, not a mapping"
    stage, loop = state.get("stage"), state.get("loop")
    if stage not in STAGES:
        return f"stage {stage!r} is not one of {', '.join(STAGES)}"
    if not isinstance(loop, dict) or type(loop.get("step")) is not int:
        return "loop.step is missing or not an int"
    if parse_name(path) != (STAGES[stage], loop["step"]):
        return f"stage {stage!r} step {loop['step']} does not match the file name"
    return rng_problem(state.get("rng"))


# ---------------------------------------------------------------------- RNG state
def rng_state(mask_generator: torch.Generator | None) -> dict[str, Any]:
    """Every RNG's state as tensors and plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": (int(version), tuple(int(x) for x in internal), None if gauss_next is None else float(gauss_next)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if mask_generator is not None:
        st["mask_generator"] = mask_generator.get_state()
    return st


def rng_problem(st: Any) -> str | None:
    """None if ``st`` is a state ``set_rng_state`` can restore, else what is wrong."""
    if not isinstance(st, dict):
        return "rng is missing"
    t = st.get("torch")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
        return "rng.torch is not a uint8 tensor"
    n = st.get("numpy")
    if not (isinstance(n, dict) and n.get("kind") == "MT19937" and isinstance(n.get("keys"), torch.Tensor)
            and n["keys"].shape == (624,) and n["keys"].dtype == torch.int64
            and bool(((n["keys"] >= 0) & (n["keys"] < 2 ** 32)).all())
            and type(n.get("pos")) is int and 0 <= n["pos"] <= 624 and type(n.get("has_gauss")) is int
            and isinstance(n.get("cached_gaussian"), float)):
        return "rng.numpy is not an MT19937 state"
    p = st.get("python")
    if not (isinstance(p, tuple) and len(p) == 3 and type(p[0]) is int and isinstance(p[1], tuple) and len(p[1]) == 625
            and all(type(x) is int and 0 <= x < 2 ** 32 for x in p[1][:624]) and type(p[1][624]) is int
            and 0 <= p[1][624] <= 624 and (p[2] is None or isinstance(p[2], float))):
        return "rng.python is not a random.getstate() state"
    for k in ("mask_generator",):
        if k in st and (not isinstance(st[k], torch.Tensor) or st[k].dtype != torch.uint8):
            return f"rng.{k} is not a uint8 tensor"
    if "cuda" in st and not (isinstance(st["cuda"], list) and all(isinstance(x, torch.Tensor) for x in st["cuda"])):
        return "rng.cuda is not a list of tensors"
    return None


def set_rng_state(st: dict[str, Any], mask_generator: torch.Generator | None) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if mask_generator is not None and "mask_generator" in st:
        mask_generator.set_state(st["mask_generator"])
