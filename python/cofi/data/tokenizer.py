"""Loading the tokenizer that belongs to a model, refusing one that cannot be it.

``transformers.AutoTokenizer`` builds a tokenizer of only the special tokens when a folder has a
config.json but no tokenizer files: every word then becomes [UNK] and a model scores like chance
with no warning. :func:`load_tokenizer` refuses that, and any tokenizer whose vocabulary does not
fit the model's embedding table.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError

# any one of these makes a folder a tokenizer folder (fast tokenizers, WordPiece, BPE, SentencePiece)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


class TokenizerError(UserError):
    """No usable tokenizer for a model (missing files, wrong vocabulary, unreadable)."""


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    d = Path(folder)
    return d.is_dir() and any((d / f).is_file() for f in TOKENIZER_FILES)


def _looks_local(name: str) -> bool:
    """A path the user meant as a folder (a hub id is ``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def model_vocab_size(model_dir: str | os.PathLike) -> int | None:
    """``vocab_size`` from a local model folder's config.json (None when it cannot be read)."""
    cfg = Path(model_dir) / "config.json"
    try:
        v = json.loads(cfg.read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def load_tokenizer(model_dir: str | os.PathLike, *, vocab_size: int | None = None,
                   tokenizer: str | os.PathLike | None = None, option: str = "--tokenizer") -> Any:
    """The tokenizer for the model in ``model_dir``: from ``tokenizer`` (a folder or hub name) when
    given, else from ``model_dir`` itself.

    Refuses (:class:`TokenizerError`, one line) a folder without tokenizer files, a tokenizer that
    cannot be loaded, and one whose vocabulary does not fit ``vocab_size`` (read from
    ``model_dir/config.json`` when None): more tokens than the embedding table has rows (ids would
    index past it), fewer than half of them, or special tokens only (every word would be [UNK]).
    ``option`` is how the user names the explicit tokenizer (in the messages).
    """
    from transformers import AutoTokenizer

    src = str(tokenizer if tokenizer is not None else model_dir)
    fix = f"give the tokenizer the model was trained with: {option} PATH"
    where = f"{option} {src}" if tokenizer is not None else f"model folder {src}"
    p = Path(src).expanduser()
    kw: dict[str, Any] = {}
    if p.exists():
        if not p.is_dir():
            raise TokenizerError(f"cofi: {where} is a file; give a folder" +
                                 (" that holds tokenizer files" if tokenizer is not None else ""))
        if not any(p.iterdir()):
            raise TokenizerError(f"cofi: {where} is empty")
        if not has_tokenizer_files(p):
            raise TokenizerError(f"cofi: {where} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): "
                                 f"every word would become [UNK]; {fix}")
        cfg = p / "config.json"
        if cfg.is_file():  # AutoTokenizer reads it to pick the tokenizer class
            try:
                d = json.loads(cfg.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                d = None
            if not isinstance(d, dict):
                raise TokenizerError(f"cofi: {cfg} is not a JSON object; the file is damaged")
            if d.get("model_type") == "cofi_compact":
                # a compact folder's config names remote code (hf_export); the tokenizer is its base model's
                # (without this, AutoTokenizer would ask whether to trust that code)
                from transformers import AutoConfig

                base = d.get("base_model_type")
                kw["config"] = AutoConfig.for_model(base if base in ("bert", "roberta") else "bert")
    elif _looks_local(src):
        raise TokenizerError(f"cofi: {where}: no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else src, **kw)
    except Exception as e:  # noqa: BLE001 - any failure to read a user's folder or hub id
        raise TokenizerError(f"cofi: cannot load a tokenizer from {where}: {' '.join(str(e).split())[:300]}") from e
    if vocab_size is None and Path(model_dir).is_dir():
        vocab_size = model_vocab_size(model_dir)
    n = len(tok)
    specials = len(set(tok.all_special_ids))
    if n <= specials:
        raise TokenizerError(f"cofi: the tokenizer from {where} has only its {n} special tokens: every word "
                             f"would become [UNK]; {fix}")
    if vocab_size is not None:
        if n > vocab_size:
            raise TokenizerError(f"cofi: the tokenizer from {where} has {n} tokens but the model's vocab_size is "
                                 f"{vocab_size} (ids past the embedding table): not the model's tokenizer; {fix}")
        if n < vocab_size // 2:
            raise TokenizerError(f"cofi: the tokenizer from {where} has {n} tokens, far fewer than the model's "
                                 f"vocab_size {vocab_size}: not the model's tokenizer; {fix}")
    return tok
