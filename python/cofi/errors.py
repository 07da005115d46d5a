"""The one base class for mistakes a user can make (bad argument, file, folder or config value).

Every error the project raises for something the user can fix derives from :class:`UserError`;
its message is one line that names the argument, what was expected and what was found. The
``cofi`` command prints such an error as ``error: <message>`` and exits with status 2; any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """A user mistake; the message is one line naming the argument, the expected and the actual."""


def first_line(e: BaseException, n: int = 160) -> str:
    """The first line of an exception's message (its type name if empty), at most ``n`` characters."""
    s = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return s if len(s) <= n else s[: n - 3] + "..."


def read_json_object(path: Path, error: type[UserError], who: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a model folder's config.json); anything else is one ``error``
    line starting with ``who``."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"{who}: {path} is not valid JSON ({first_line(e)}); the file is damaged") from None
    if not isinstance(obj, dict):
        raise error(f"{who}: {path} must hold a JSON object, got {type(obj).__name__}")
    return obj
