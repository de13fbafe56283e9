"""Planning to a measured latency budget: ``target_latency=`` and ``max_latency=``.

``target_latency`` is a fraction in (0, 1] of the measured latency of the network the
:class:`~rnip_ext.pruning.latency.LatencyTable` was built for (the unpruned one); ``max_latency``
an absolute limit in seconds per forward pass at the table's batch size. The channels kept are
chosen by :meth:`LatencyTable.select` (a knapsack over importance per unit of measured latency,
:mod:`rnip_ext.pruning.knapsack`; ``rule="knapsack"``, the default) or by the paper's global
score threshold with latency as the budget (:meth:`LatencyTable.select_threshold`;
``rule="threshold"``), each group keeping its best-scored channels, with every width a multiple
of ``round_to`` or the group's whole width.

Which rule: the knapsack keeps the most summed importance per second, so it spends the budget
where channels are cheap. That is what the method is for once the importances have receded
(bimodal: the channels it keeps or drops are near 0 or near the top of their layer), and there
it matched the threshold rule's accuracy at equal latency while keeping more importance. On a
network whose importances have *not* receded (flat scores), more summed importance means more
channels in cheap layers and narrow bottlenecks elsewhere, and it cost accuracy against the
threshold rule at equal latency (docs/latency.md, "Accuracy at equal latency"): there use
``rule="threshold"``, or train until the importances recede. Groups of a grouped convolution
(which lose whole blocks of channels) are kept whole by latency plans.
"""

from __future__ import annotations

import math
import os
import statistics

import torch
from torch import nn

from .._validation import check_int, is_number
from .graph import eval_mode
from .latency import CudaEventTimer, LatencyTable, WallClockTimer
from .rounding import check_round_to, keep_best

__all__ = ["LATENCY_RULES", "check_latency_budget", "check_latency_rule", "latency_table_for", "plan_to_latency",
           "refuse_latency_options"]

LATENCY_RULES = ("knapsack", "threshold")  # the first is the default


def check_latency_rule(rule, name: str = "rule") -> str:
    """``rule`` when it is one of :data:`LATENCY_RULES`; a ``ValueError`` naming ``name`` otherwise."""
    if rule not in LATENCY_RULES:
        raise ValueError(f"{name} must be one of {LATENCY_RULES}, got {rule!r}")
    return rule


def refuse_latency_options(latency_table, latency_rule) -> None:
    """A ``ValueError`` when a latency table or a non-default rule comes without a latency budget."""
    if latency_table is not None or latency_rule != LATENCY_RULES[0]:
        raise ValueError("latency_table and latency_rule go with target_latency= or max_latency=")


def check_latency_budget(target_latency=None, max_latency=None) -> tuple[str, float]:
    """``("target_latency" | "max_latency", value)``: exactly one of a fraction in (0, 1] of the
    unpruned network's measured latency and a positive number of seconds; ``ValueError`` otherwise."""
    if (target_latency is None) == (max_latency is None):
        raise ValueError("give exactly one latency budget: target_latency= (a fraction of the unpruned network's "
                         "measured latency) or max_latency= (seconds per forward pass)")
    if target_latency is not None:
        if not is_number(target_latency) or not 0.0 < target_latency <= 1.0:
            raise ValueError(f"target_latency must be a fraction in (0, 1], got {target_latency!r}")
        return "target_latency", float(target_latency)
    if not is_number(max_latency) or max_latency <= 0:
        raise ValueError(f"max_latency must be a positive number of seconds, got {max_latency!r}")
    return "max_latency", float(max_latency)


def latency_table_for(model: nn.Module, example_inputs, table=None, *, round_to: int | None = None,
                      min_channels: int = 3, progress: bool = True,
                      residual_streams: bool = False) -> tuple[LatencyTable, dict[str, int]]:
    """The table to plan with and ``model``'s current group widths: ``table`` as given (a
    :class:`LatencyTable` or the path of a saved one, validated against ``model``, which may be
    a narrowed version of the table's network, and measured for the same ``residual_streams``),
    or a new one measured now (``None``)."""
    if table is None:
        table = LatencyTable.build(model, example_inputs, round_to=round_to, min_channels=min_channels,
                                   progress=progress, residual_streams=residual_streams)
    elif isinstance(table, (str, os.PathLike)):
        table = LatencyTable.load(table)
    elif not isinstance(table, LatencyTable):
        raise TypeError(f"latency_table must be a LatencyTable, a path or None, got {type(table).__name__}")
    if table.residual_streams != residual_streams:
        raise ValueError(f"the latency table was built with residual_streams={table.residual_streams}, the plan asks "
                         f"for residual_streams={residual_streams}: build the table with the same setting")
    widths = table.validate(model, example_inputs, narrowed=True)
    return table, widths


def _measured(model: nn.Module, small: nn.Module, inputs: tuple, timer, kind: str, scale: float) -> float:
    """The pruned network's latency in seconds: for a fraction budget the median over three
    back-to-back pairs of ``small / model`` times ``scale`` (the table's prediction for
    ``model``; pairs cancel drifting load on a shared machine), for ``max_latency`` the median of
    three timings of ``small``."""
    with eval_mode(small), eval_mode(model):
        if kind == "max_latency":
            return statistics.median(timer(small, inputs) for _ in range(3))
        return scale * statistics.median(timer(small, inputs) / timer(model, inputs) for _ in range(3))


def plan_to_latency(model: nn.Module, *, example_inputs, target_latency: float | None = None,
                    max_latency: float | None = None, latency_table=None, round_to: int | None = None,
                    min_channels: int = 3, fold: str = "approximate", refine: int = 2,
                    tolerance: float = 0.05, timer=None, progress: bool = True, residual_streams: bool = False,
                    rule: str = "knapsack"):
    """A :class:`~rnip_ext.pruning.PruningPlan` meeting a latency budget (module docstring).

    The table chooses the widths for a budget of predicted seconds. The table's sum of layers
    timed one by one misses how they interact in the network (caches, the rest of the network
    is not quite fixed), so with ``refine > 0`` the pruned network itself is then timed
    (:func:`_measured`), and while it misses ``[1 - tolerance, 1] x budget`` the predicted
    budget is scaled by ``budget / measured`` and the widths chosen again, at most ``refine``
    times (bracketed: never beyond a predicted budget already found too loose or too tight).
    The plan kept is the measured candidate closest to the budget from below (else the fastest). ``timer``: as for :meth:`LatencyTable.build` (default: the device's).

    The plan also carries ``target_latency``/``max_latency`` (the request), ``latency``:
    ``(before, predicted, measured)`` seconds (``measured`` ``None`` without ``refine``) and
    ``latency_table``. ``residual_streams``: plan over the groups of
    :func:`rnip_ext.pruning.plan` with ``residual_streams=True`` (the table must be built so).
    ``rule``: ``"knapsack"`` (:meth:`LatencyTable.select`) or ``"threshold"``
    (:meth:`LatencyTable.select_threshold`), see the module docstring.
    """
    from .apply import apply
    from .plan import plan_from_keep

    kind, value = check_latency_budget(target_latency, max_latency)
    check_latency_rule(rule)
    round_to = check_round_to(round_to)
    check_int("min_channels", min_channels, 1)
    check_int("refine", refine, 0)
    if not is_number(tolerance) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1), got {tolerance!r}")
    table, widths = latency_table_for(model, example_inputs, latency_table, round_to=round_to,
                                      min_channels=min_channels, progress=progress,
                                      residual_streams=residual_streams)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if timer is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        timer = CudaEventTimer() if device.type == "cuda" else WallClockTimer()
    goal = value * table.full if kind == "target_latency" else value
    choose = table.select if rule == "knapsack" else table.select_threshold
    before = table.predict(widths)
    current = plan_from_keep(model, {}, example_inputs=example_inputs, fold=fold, residual_streams=residual_streams)
    # Grouped convs lose whole groups of channels: not in the latency plans yet, kept whole.
    blocks = [g.name for g in current.groups if getattr(g, "unit", 1) > 1]
    request = f"target_latency={value:g}" if kind == "target_latency" else f"max_latency={value:g} s"

    budget, candidates, low, high = goal, [], 0.0, math.inf  # predicted budgets known too low / too high
    for attempt in range(refine + 1):
        try:
            selection = choose(current.scores, budget, round_to=round_to, min_channels=min_channels,
                               widths=widths, fixed=blocks)
        except ValueError as exc:
            if "cannot be met" not in str(exc):
                raise
            if candidates:  # a refined budget below reach: keep what was measured
                break
            raise ValueError(f"{request} cannot be met: {exc} (the unpruned network measured "
                             f"{table.full * 1e3:.3g} ms)") from exc
        keep = {g: keep_best(current.scores[g], w) for g, w in selection.widths.items() if w < widths[g]}
        candidate = plan_from_keep(model, keep, example_inputs=example_inputs, fold=fold,
                                   residual_streams=residual_streams)
        measured = None
        if refine:
            measured = _measured(model, apply(model, candidate), inputs, timer, kind, before)
        candidates.append((candidate, selection.cost, measured))
        if measured is None or (1 - tolerance) * goal <= measured <= goal:
            break
        # Scale by what was missed, kept inside the bracket of budgets already tried (a step
        # in widths can jump over the goal): halfway to the other side when it would leave it.
        if measured > goal:
            high = budget
        else:
            low = budget
        scaled = budget * goal / measured
        budget = scaled if low < scaled < high else (low + high) / 2 if math.isfinite(high) else 2 * budget
    below = [c for c in candidates if c[2] is None or c[2] <= goal]
    result, predicted, measured = (max(below, key=lambda c: c[2] or 0.0) if below
                                   else min(candidates, key=lambda c: c[2]))
    result.min_channels = min_channels
    result.round_to = round_to
    result.target_latency = value if kind == "target_latency" else None
    result.max_latency = value if kind == "max_latency" else None
    result.latency = (before, predicted, measured)
    result.latency_table = table
    result.latency_rule = rule
    return result
