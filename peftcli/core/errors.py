"""The one error the command line maps to exit code 2.

Bad input — a recipe key, a data file, a run folder, a flag — is the user's to fix, so it gets one
short message naming the file, the key and the fix, and exit 2; anything else is a failure while
running (exit 1). Every layer raises a subclass of `BadInput` for the first kind, so `cli.py`
catches one class and no command re-wraps another's errors.
"""

from __future__ import annotations


class BadInput(Exception):
    """Input the user can fix; the message says how. Exit code 2."""


class DataError(BadInput, RuntimeError):
    """Data that cannot be read or used as the recipe says (a file, a column, a label, packing)."""


class CheckpointError(BadInput, RuntimeError):
    """An adapter or run file that is missing, malformed or not what the reader expects."""


class UsageError(BadInput):
    """Bad command-line input that is not a recipe problem (a flag, an argument count, a name)."""
