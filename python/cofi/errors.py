"""The one base class for mistakes a user can make (bad argument, file, folder or config value).

Every error the project raises for something the user can fix derives from :class:`UserError`;
its message is one line that names the argument, what was expected and what was found. The
``cofi`` command prints such an error as ``error: <message>`` and exits with status 2; any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A user mistake; the message is one line naming the argument, the expected and the actual."""
