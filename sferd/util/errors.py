"""Errors a stage reports as one line (kept apart from run.py, which also runs as __main__)."""


class StageError(Exception):
    """A problem the user can fix; the message says what happened and how to fix it."""
