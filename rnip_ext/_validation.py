"""Argument checks shared by the package: errors name the argument, the range and the value given.

``bool`` is an ``int`` subclass in Python, so ``True`` would pass as ``1`` everywhere; every check
here refuses it where a count or a number is asked for.
"""

from __future__ import annotations

import math

__all__ = ["check_fraction", "check_int", "check_number", "describe_range", "is_int", "is_number"]


def is_int(x) -> bool:
    """``x`` is an ``int`` and not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x, *, finite: bool = True) -> bool:
    """``x`` is an ``int`` or ``float`` (not a ``bool``), and finite unless ``finite=False``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return math.isfinite(x) or not finite


def describe_range(low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> str:
    """The range as messages say it: ``">= 1"``, ``"> 0"``, ``"< 1"``, ``"in (0, 1]"`` (``""`` for none)."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _within(x, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (x > low if low_open else x >= low):
        return False
    return high is None or (x < high if high_open else x <= high)


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``, else ``ValueError("<name> must be
    an int >= <low>, got <value>")``."""
    if not is_int(value) or not _within(value, low, high, False, False):
        span = describe_range(low, high)
        raise ValueError(f"{name} must be an int{' ' + span if span else ''}, got {value!r}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``float(value)`` if it is a finite int or float (not a bool) within the bounds (open or closed),
    else ``ValueError("<name> must be a finite number <range>, got <value>")``."""
    if not is_number(value) or not _within(value, low, high, low_open, high_open):
        span = describe_range(low, high, low_open=low_open, high_open=high_open)
        raise ValueError(f"{name} must be a finite number{' ' + span if span else ''}, got {value!r}")
    return float(value)


def check_fraction(name: str, value, *, low_open: bool = True, high_open: bool = False) -> float:
    """:func:`check_number` on ``(0, 1]`` by default (a fraction of something that must stay)."""
    return check_number(name, value, 0, 1, low_open=low_open, high_open=high_open)
