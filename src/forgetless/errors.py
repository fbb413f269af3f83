"""One exception type for every user-facing failure.

The CLI prints ``ForgetlessError`` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class ForgetlessError(Exception):
    """A bad input or an impossible request, explained in one line."""
