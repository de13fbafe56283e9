"""Planning to a measured latency budget: ``target_latency=`` and ``max_latency=``.

``target_latency`` is a fraction in (0, 1] of the measured latency of the network the
:class:`~rnip_ext.pruning.latency.LatencyTable` was built for (the unpruned one); ``max_latency``
an absolute limit in seconds per forward pass at the table's batch size. The channels kept are
chosen by :meth:`LatencyTable.select` (a knapsack over importance per unit of measured latency,
:mod:`rnip_ext.pruning.knapsack`), each group keeping its best-scored channels, with every
width a multiple of ``round_to`` or the group's whole width.
"""

from __future__ import annotations

import math
import os

from torch import nn

from .latency import LatencyTable
from .rounding import check_round_to, keep_best

__all__ = ["check_latency_budget", "latency_table_for", "plan_to_latency"]


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_latency_budget(target_latency=None, max_latency=None) -> tuple[str, float]:
    """``("target_latency" | "max_latency", value)``: exactly one of a fraction in (0, 1] of the
    unpruned network's measured latency and a positive number of seconds; ``ValueError`` otherwise."""
    if (target_latency is None) == (max_latency is None):
        raise ValueError("give exactly one latency budget: target_latency= (a fraction of the unpruned network's "
                         "measured latency) or max_latency= (seconds per forward pass)")
    if target_latency is not None:
        if not _is_number(target_latency) or not 0.0 < target_latency <= 1.0:
            raise ValueError(f"target_latency must be a fraction in (0, 1], got {target_latency!r}")
        return "target_latency", float(target_latency)
    if not _is_number(max_latency) or max_latency <= 0:
        raise ValueError(f"max_latency must be a positive number of seconds, got {max_latency!r}")
    return "max_latency", float(max_latency)


def latency_table_for(model: nn.Module, example_inputs, table=None, *, round_to: int | None = None,
                      min_channels: int = 3, progress: bool = True) -> tuple[LatencyTable, dict[str, int]]:
    """The table to plan with and ``model``'s current group widths: ``table`` as given (a
    :class:`LatencyTable` or the path of a saved one, validated against ``model``, which may be
    a narrowed version of the table's network), or a new one measured now (``None``)."""
    if table is None:
        table = LatencyTable.build(model, example_inputs, round_to=round_to, min_channels=min_channels,
                                   progress=progress)
    elif isinstance(table, (str, os.PathLike)):
        table = LatencyTable.load(table)
    elif not isinstance(table, LatencyTable):
        raise TypeError(f"latency_table must be a LatencyTable, a path or None, got {type(table).__name__}")
    widths = table.validate(model, example_inputs, narrowed=True)
    return table, widths


def plan_to_latency(model: nn.Module, *, example_inputs, target_latency: float | None = None,
                    max_latency: float | None = None, latency_table=None, round_to: int | None = None,
                    min_channels: int = 3, fold: str = "approximate", progress: bool = True):
    """A :class:`~rnip_ext.pruning.PruningPlan` whose predicted latency meets the budget (see the
    module docstring). The plan also carries ``target_latency``/``max_latency`` (the request),
    ``latency`` (``(before, after)`` predicted seconds) and ``latency_table``."""
    from .plan import plan_from_keep

    kind, value = check_latency_budget(target_latency, max_latency)
    round_to = check_round_to(round_to)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    table, widths = latency_table_for(model, example_inputs, latency_table, round_to=round_to,
                                      min_channels=min_channels, progress=progress)
    budget = value * table.full if kind == "target_latency" else value
    current = plan_from_keep(model, {}, example_inputs=example_inputs, fold=fold)
    try:
        selection = table.select(current.scores, budget, round_to=round_to, min_channels=min_channels, widths=widths)
    except ValueError as exc:
        if "cannot be met" not in str(exc):
            raise
        request = f"target_latency={value:g}" if kind == "target_latency" else f"max_latency={value:g} s"
        raise ValueError(f"{request} cannot be met: {exc} (the unpruned network measured "
                         f"{table.full * 1e3:.3g} ms)") from exc
    keep = {g: keep_best(current.scores[g], w) for g, w in selection.widths.items() if w < widths[g]}
    result = plan_from_keep(model, keep, example_inputs=example_inputs, fold=fold)
    result.min_channels = min_channels
    result.target_latency = value if kind == "target_latency" else None
    result.max_latency = value if kind == "max_latency" else None
    result.latency = (table.predict(widths), selection.cost)
    result.latency_table = table
    return result
