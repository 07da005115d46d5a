"""The run's metrics log (``metrics.jsonl``): one JSON record per line, appended by rank 0."""
from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint as C


class JsonlLog:
    """Append-only JSONL metrics log. A resumed run keeps only the records of the steps its
    checkpoint reached (``truncate_after``), so its log equals the uninterrupted run's."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop every record after (stage index, step) in run order, and a torn last line."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill
            if (C.STAGES.get(r.get("stage"), -1), r.get("step", 0)) <= (stage, step):
                keep.append(line)
        C.atomic_write_bytes(self.path, ("\n".join(keep) + ("\n" if keep else "")).encode())

    def write(self, rec: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
