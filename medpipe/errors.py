"""One base class for every expected failure: a user's data, parameters or environment at fault.

A stage or command that raises a :class:`UserError` prints its message (which names the file, the
parameter or the value) and exits with status 1; anything else is a bug and keeps its traceback.
Subclasses keep a builtin base (``ValueError``, ``FileNotFoundError``, ...) where callers catch those.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure caused by input, parameters or environment, with a message that says what to fix."""
