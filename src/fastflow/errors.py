"""The project's error type for problems a user can fix (input, weights, config, files)."""

from __future__ import annotations

import re

__all__ = ["FastFlowError", "first_line"]


class FastFlowError(ValueError):
    """A one-line, user-facing error that names the offending thing and the fix.

    The CLI prints these without a traceback and exits non-zero; anything else is a bug.
    """


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text (its type name if it has none), without
    terminal colour codes: enough to quote inside a one-line ``FastFlowError``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(error).__name__
