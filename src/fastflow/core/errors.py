"""The project's error type for problems a user can fix (input, weights, config, files), and the
one way a setting is checked against its valid range."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["FastFlowError", "first_line", "is_integer", "is_real", "require"]


class FastFlowError(ValueError):
    """A one-line, user-facing error that names the offending thing and the fix.

    The CLI prints these without a traceback and exits non-zero; anything else is a bug.
    """


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text (its type name if it has none), without
    terminal colour codes: enough to quote inside a one-line ``FastFlowError``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(error).__name__


def is_integer(value: Any) -> bool:
    """An int that is not a bool (YAML's ``yes`` must not count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, name: str, valid: str, value: Any) -> None:
    """Raise the one-line ``FastFlowError`` "``name`` must be ``valid``, got ``value``" unless ``ok``."""
    if not ok:
        raise FastFlowError(f"{name} must be {valid}, got {value!r}")
