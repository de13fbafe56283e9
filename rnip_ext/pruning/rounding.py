"""Hardware-aligned widths: every pruned layer keeps a multiple of ``round_to`` channels, or all.

Pure functions on group sizes, keep counts and per-channel scores; the planners call them. A
channel group (coupled BatchNorms included) has one width, so coupled layers stay equal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validation import is_int

__all__ = ["allowed_widths", "check_round_to", "keep_best", "round_width"]


def check_round_to(round_to) -> int:
    """``round_to`` as an int >= 1 (``None`` means 1, no rounding); ``ValueError`` otherwise."""
    if round_to is None:
        return 1
    if not is_int(round_to) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1 (or None for no rounding), got {round_to!r}")
    return round_to


def _smallest(channels: int, round_to: int, min_channels: int) -> int:
    """The narrowest allowed width: the first multiple of ``round_to`` at or above
    ``min(min_channels, channels)``, or ``channels`` when that multiple is not narrower."""
    least = round_to * math.ceil(min(min_channels, channels) / round_to)
    return least if least < channels else channels


def allowed_widths(channels: int, round_to: int = 1, min_channels: int = 1) -> list[int]:
    """The widths a layer of ``channels`` may keep, ascending: the multiples of ``round_to`` from
    ``round_to * ceil(min(min_channels, channels) / round_to)`` below ``channels``, and ``channels``."""
    if channels < 1:
        raise ValueError(f"a layer has at least one channel, got {channels}")
    round_to = check_round_to(round_to)
    least = _smallest(channels, round_to, min_channels)
    return list(range(least, channels, round_to)) + [channels]


def round_width(count: int, channels: int, round_to: int = 1, min_channels: int = 1) -> int:
    """``count`` kept channels rounded to the nearest allowed width (:func:`allowed_widths`; halfway
    rounds down). Non-decreasing in ``count``, so a search over nested candidates stays valid."""
    round_to = check_round_to(round_to)
    least = _smallest(channels, round_to, min_channels)
    if count >= channels:
        return channels
    if count <= least:
        return least
    down = least + round_to * ((count - least) // round_to)
    up = min(down + round_to, channels)
    return down if count - down <= up - count else up


def keep_best(scores: Tensor, width: int) -> Tensor:
    """Sorted int64 indices of the ``width`` highest-scored channels. Ties go the way of the
    planners' removal order (ascending score, stable): of equal scores the later channel stays."""
    if not 1 <= width <= len(scores):
        raise ValueError(f"width must be in [1, {len(scores)}], got {width}")
    order = torch.argsort(scores.detach().cpu().to(torch.float64), stable=True)
    return torch.sort(order[len(scores) - width:]).values.to(torch.int64)
