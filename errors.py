"""Errors that are the user's to fix.

The CLI prints a :class:`UsageError` as one line and exits with code 2; any other
exception is a bug and keeps its traceback.
"""


class UsageError(ValueError):
    """A bad value given by the user: the message names it and what is allowed."""
