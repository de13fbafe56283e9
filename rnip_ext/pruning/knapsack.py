"""Choosing per-group widths that keep the most importance under a cost budget (e.g. latency).

The problem: each channel group ``g`` keeps a width ``w_g`` from its allowed widths
(:func:`~rnip_ext.pruning.rounding.allowed_widths`), keeping its ``w_g`` best channels, worth
``I_g(w_g)`` = the sum of their scores; the cost is ``constant + sum_t f_t(widths of t's groups)``
(a layer's measured time depends on its input and output widths, so terms couple neighbouring
groups). Maximise ``sum_g I_g(w_g)`` subject to ``cost <= budget``: a multiple-choice knapsack,
NP-hard in general.

The algorithm (:func:`select_widths`), greedy by importance per unit of cost:

1. Start with every group whole. While the cost exceeds the budget, every group proposes its
   best step down: the narrower allowed width ``v`` with the least importance lost per cost
   saved, ``(I_g(w_g) - I_g(v)) / (cost(w) - cost(w with w_g = v))`` over every ``v < w_g`` that
   saves cost (looking past the next width skips widths that are slower than wider ones). The
   cheapest step of all groups is taken; the proposals of the group and of the groups sharing a
   cost term with it are recomputed.
2. Fill: while some step up (a group widened to any allowed width) fits in what is left of the
   budget, the one with the most importance gained per cost added is taken.

Optimality gap: when every term involves one group (a separable cost), the steps of step 1 are
the segments of each group's upper concave hull of (cost, importance) points, taken in
ascending slope over all groups -- the greedy that solves the knapsack's LP relaxation
(Sinha & Zoltners, 1979). Step 1 stops at the first step that meets the budget, so the LP
optimum, and with it the true optimum, is at most the importance before that step:
``optimum <= importance + last_step`` (:attr:`Selection.gap_bound`); step 2 only adds. With
coupled terms (a conv's time depends on both of its widths) each step's cost is exact for the
current neighbours, but the hull argument no longer holds and no bound is claimed; the tests
compare with brute force on small instances.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .rounding import allowed_widths

__all__ = ["Selection", "select_widths"]

Term = tuple[Sequence[str], Callable[..., float]]


@dataclass
class Selection:
    """The widths chosen by :func:`select_widths` and what they cost and keep.

    ``gap_bound``: the importance removed by the last step that met the budget; for a separable
    cost the optimum keeps at most ``importance + gap_bound`` (0 when nothing had to go; ``nan``
    from :meth:`~rnip_ext.pruning.latency.LatencyTable.select_threshold`, which claims no bound).
    """

    widths: dict[str, int]
    cost: float
    importance: float
    gap_bound: float
    steps: int


def _prefix_importance(scores: Tensor) -> list[float]:
    """``out[w]``: the sum of the ``w`` largest scores (float64 sums)."""
    s = torch.sort(scores.detach().cpu().to(torch.float64), descending=True).values
    return [0.0] + torch.cumsum(s, 0).tolist()


def select_widths(channels: dict[str, int], scores: dict[str, Tensor], terms: Sequence[Term], budget: float, *,
                  constant: float = 0.0, round_to: int = 1, min_channels: int = 1,
                  fixed: Sequence[str] = ()) -> Selection:
    """Widths per group keeping the most importance with ``constant + sum f(...) <= budget``.

    ``channels``: each group's full width; ``scores``: its per-channel importance (1-D, that
    length); ``terms``: ``(group names, f)`` pairs, ``f`` called with those groups' widths in
    that order; groups named in ``fixed`` keep their width. Greedy by importance per unit of
    cost, then a fill step (algorithm and optimality gap in this module's docstring).
    ``ValueError`` when the budget cannot be met.
    """
    if not channels:
        raise ValueError("no channel groups to choose widths for")
    for g, c in channels.items():
        if g not in scores or len(scores[g]) != c:
            raise ValueError(f"scores for group {g!r} must have {c} entries")
    terms = [(tuple(names), fn) for names, fn in terms]
    for names, _ in terms:
        unknown = [n for n in names if n not in channels]
        if unknown:
            raise ValueError(f"a cost term names groups that are not given: {unknown}")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number, got {budget!r}")

    allowed = {g: [c] if g in fixed else allowed_widths(c, round_to, min_channels) for g, c in channels.items()}
    worth = {g: _prefix_importance(scores[g]) for g in channels}
    of_group: dict[str, list[int]] = {g: [] for g in channels}
    neighbours: dict[str, set[str]] = {g: {g} for g in channels}
    for i, (names, _) in enumerate(terms):
        for n in set(names):
            of_group[n].append(i)
            neighbours[n].update(names)
    widths = dict(channels)

    def local(g: str, v: int) -> float:
        """The cost of the terms that involve ``g`` with ``g`` at width ``v``."""
        total = 0.0
        for i in of_group[g]:
            names, fn = terms[i]
            total += fn(*[v if n == g else widths[n] for n in names])
        return total

    def total() -> float:
        return constant + sum(fn(*[widths[n] for n in names]) for names, fn in terms)

    def step_down(g: str):
        """``(importance lost / cost saved, width, importance lost)`` of g's best step, or None."""
        now, best = local(g, widths[g]), None
        for v in reversed(allowed[g]):  # from the widest: on equal ratios the smaller step wins
            if v >= widths[g]:
                continue
            saved = now - local(g, v)
            if saved <= 0:
                continue
            lost = worth[g][widths[g]] - worth[g][v]
            if best is None or lost / saved < best[0]:
                best = (lost / saved, v, lost)
        return best

    cost, steps, last = total(), 0, 0.0
    proposals = {g: step_down(g) for g in channels}
    while cost > budget:
        candidates = [(p[0], g) for g, p in proposals.items() if p is not None]
        if not candidates:
            least = {g: a[0] for g, a in allowed.items()}
            widths.update(least)
            raise ValueError(f"a cost of {budget:.6g} cannot be met: narrowing any layer further saves nothing at "
                             f"{cost:.6g} (every layer at its narrowest costs {total():.6g}; round_to={round_to}, "
                             f"min_channels={min_channels})")
        _, g = min(candidates)
        _, widths[g], last = proposals[g]
        steps += 1
        cost = total()
        for n in neighbours[g]:
            proposals[n] = step_down(n)

    while True:  # fill what is left of the budget
        best = None
        for g in channels:
            now = local(g, widths[g])
            for v in allowed[g]:
                if v <= widths[g]:
                    continue
                added = local(g, v) - now
                gained = worth[g][v] - worth[g][widths[g]]
                if gained <= 0 or cost + added > budget:
                    continue
                ratio = math.inf if added <= 0 else gained / added
                if best is None or ratio > best[0]:
                    best = (ratio, g, v)
        if best is None:
            break
        previous = widths[best[1]]
        widths[best[1]] = best[2]
        new = total()
        if new > budget:  # the local difference and the full sum disagree in the last bits: undo, stop
            widths[best[1]] = previous
            break
        cost, steps = new, steps + 1

    importance = sum(worth[g][w] for g, w in widths.items())
    return Selection(widths=widths, cost=cost, importance=importance, gap_bound=last, steps=steps)
