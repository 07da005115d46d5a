"""Loading of the compiled extension ``cofi._C`` and the build record written by setup.py."""
from __future__ import annotations

import functools
import importlib
import json
import warnings
from pathlib import Path

import torch

_BUILD_INFO = Path(__file__).with_name("_build_info.json")
_error: str | None = None
_loaded = False


def build_info() -> dict:
    """What setup.py recorded: torch built against, CUDA version, arch list, CUDA compiled, git sha."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _load() -> None:
    global _loaded, _error
    try:
        importlib.import_module("cofi._C")
        _loaded = True
    except ImportError as e:
        built_for = build_info().get("torch")
        hint = f" (built for torch {built_for}, running {torch.__version__})" if built_for else ""
        _error = f"{e}{hint}"
        warnings.warn(f"cofi: native extension cofi._C failed to load: {_error}; native backend disabled", stacklevel=2)


_load()


def native_loaded() -> bool:
    return _loaded


def native_error() -> str:
    return _error or "not attempted"


@functools.lru_cache(maxsize=None)
def has_kernel(native_op: str, dispatch_key: str) -> bool:
    """Ask the dispatcher whether ``cofi::<native_op>`` has a kernel for ``dispatch_key``."""
    if not _loaded:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"cofi::{native_op}", dispatch_key)
    except RuntimeError:
        return False
