"""The one error type for input a user can fix.

A :class:`UserError` says what was wrong with what the user gave (an argument, a config
value, a file, a workdir) and how to mend it; the command line prints its message
briefly and exits with status 2. Every other exception is a bug or an environment
failure and keeps its traceback.

Subclasses also derive from the builtin a caller would expect (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can mend; the message names the problem and the accepted range."""


class InvalidArgument(UserError, ValueError):
    """An argument outside its accepted range (``--steps 0``, ``--guidance nan``, ...)."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or trained stage that should exist does not."""


def check_positive_int(name: str, value, *, allow_none: bool = False, minimum: int = 1) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes when ``allow_none``), else InvalidArgument."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            hasattr(value, "__index__") and not isinstance(value, float)):
        raise InvalidArgument(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise InvalidArgument(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_finite(name: str, value, *, allow_none: bool = False, minimum: float | None = None) -> float | None:
    """``value`` as a finite float (>= ``minimum`` when given), else InvalidArgument."""
    import math

    if value is None and allow_none:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


class OutputExists(UserError, FileExistsError):
    """An output that would overwrite something already there."""
