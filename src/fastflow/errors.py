"""The project's error type for problems a user can fix (input, weights, config, files)."""

from __future__ import annotations

__all__ = ["FastFlowError"]


class FastFlowError(ValueError):
    """A one-line, user-facing error that names the offending thing and the fix.

    The CLI prints these without a traceback and exits non-zero; anything else is a bug.
    """
