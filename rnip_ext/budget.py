"""The budget of one training run: which cost, how far, on what timeline, and how hard to push.

:class:`rnip_ext.BudgetPruner` is built from the three pieces here; everything that checks a
budget or knows the schedule lives in this module, once:

* :func:`check_budget`: ``target_flops=`` or ``target_params=``, a fraction in (0, 1];
* :class:`BudgetSchedule`: over ``n`` pruner steps (epochs, or groups of optimiser steps),
  ``warmup`` steps at full width, then a geometric curve of the cost fraction the network
  should have left, ``target ** ((i - warmup) / (by - warmup))``, reaching the target at step
  ``by``; the network is cut to the curve ``settle`` steps behind it, so it meets the budget
  exactly from step ``by + settle`` on and the last steps train it at its final size.
  The curve is made no steeper than ``max_step_removal`` (the share of the remaining cost one
  step may remove), in short runs too: ``by`` moves later, then the warm-up and settling
  steps shrink, and a run too short for that is refused before anything trains;
* :class:`StrengthController`: the regulariser's strength for the next step, from how much
  receded during the last one against what the curve still asks for.

In the project's trainer a budget run is ``fit(model, splits, epochs=E, regularizer=pruner,
callbacks=run_callbacks(out, splits, budget=pruner))`` (:mod:`rnip_ext.callbacks`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ._validation import check_int, is_number

__all__ = ["BUDGET_SHIFT", "COSTS", "MAX_STRENGTH", "START_STRENGTH", "BudgetSchedule", "RunTooShortError",
           "StrengthController", "StrengthRecord", "check_budget"]

COSTS = ("flops", "params")
# The focused penalty's shift; where BudgetPruner's controller starts, and its cap, per update mode.
BUDGET_SHIFT = 1.0
START_STRENGTH = {"decoupled": 20.0, "loss": 2.0}
MAX_STRENGTH = {"decoupled": 200.0, "loss": 10.0}


class RunTooShortError(ValueError):
    """A run has too few pruner steps to reach its budget at the allowed pace."""


def check_budget(target_flops=None, target_params=None) -> tuple[str, float]:
    """``(cost, fraction)`` of a budget: exactly one of ``target_flops`` (fraction of the
    multiply-accumulates kept) and ``target_params`` (fraction of the parameters kept), in
    (0, 1]; ``ValueError`` naming the problem otherwise."""
    given = [(k, v) for k, v in (("flops", target_flops), ("params", target_params)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one budget: target_flops= (fraction of the FLOPs kept) or target_params= "
                         f"(fraction of the parameters kept), got {len(given)}")
    kind, value = given[0]
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"target_{kind} must be a fraction in (0, 1], got {value!r}")
    return kind, float(value)


@dataclass(frozen=True)
class BudgetSchedule:
    """When the network of a budget run narrows; steps are counted from 1 (after the first interval).

    ``target``: the cost fraction to end at; ``steps``: pruner steps in the run (``n``);
    ``warmup``: steps at full width (nothing focused before step ``warmup`` ends);
    ``by``: the step at which the curve reaches ``target``; ``settle``: how many steps the
    cut trails the curve. Build with :meth:`make`, which validates and fits short runs.
    """

    target: float
    steps: int
    warmup: int
    by: int
    settle: int

    @classmethod
    def make(cls, target: float, steps: int, *, budget_at: float = 1 / 3, warmup: int = 2, settle: int = 2,
             max_step_removal: float = 0.5, min_warmup: int = 0) -> "BudgetSchedule":
        """The schedule for ``steps`` pruner steps reaching ``target`` at ``budget_at`` of them.

        ``by = clip(round(budget_at * steps), warmup + k, steps - 1)`` where ``k`` is the fewest
        steps in which the curve reaches ``target`` removing at most ``max_step_removal`` of the
        remaining cost per step; if the run is too short, ``settle`` then ``warmup`` (not below
        ``min_warmup``) shrink. ``ValueError`` when even then the budget cannot be met one step
        before the end (at least one step trains at the budget), naming the minimum."""
        if not is_number(target) or not 0.0 < target <= 1.0:
            raise ValueError(f"the target must be a fraction in (0, 1], got {target!r}")
        check_int("the number of steps (epochs, or steps // every)", steps, 2)
        check_int("warmup", warmup, 0)
        check_int("settle", settle, 0)
        if not is_number(budget_at) or not 0.0 < budget_at <= 1.0:
            raise ValueError(f"budget_at must be a fraction of the run in (0, 1], got {budget_at!r}")
        if not is_number(max_step_removal) or not 0.0 < max_step_removal < 1.0:
            raise ValueError(f"max_step_removal must be a fraction in (0, 1), got {max_step_removal!r}")
        k = 1 if target == 1.0 else max(1, math.ceil(math.log(target) / math.log1p(-max_step_removal) - 1e-9))
        last = steps - 1  # the budget is met at a step < steps: one interval trains at it
        w = min(warmup, last - k)
        if w < min_warmup:
            need = min_warmup + k + 1
            raise RunTooShortError(
                f"{steps} steps are too few to reach {target:g} of the cost removing at most {max_step_removal:g} of "
                f"the rest per step: it takes {k} steps after {min_warmup} warm-up step(s) and one more at the budget "
                f"({need} in all). Train for more epochs, call step() more often (steps=, every=), or allow a larger "
                f"max_step_removal")
        by = min(last, max(round(budget_at * steps), w + k))
        return cls(float(target), steps, w, by, min(settle, last - by))

    def target_at(self, step: int) -> float:
        """The cost fraction the curve asks the active network to have after ``step`` (1 up to the warm-up's end)."""
        progress = min(1.0, max(0.0, (step - self.warmup) / (self.by - self.warmup)))
        return self.target ** progress

    def cut_at(self, step: int) -> float | None:
        """The fraction the network is cut to after ``step``: the curve ``settle`` steps back, or
        ``None`` while that is still the full network."""
        trailing = step - self.settle
        return None if trailing <= self.warmup else self.target_at(trailing)

    @property
    def done(self) -> int:
        """The step after which the network meets the budget exactly."""
        return self.by + self.settle

    def focused(self, step: int) -> bool:
        """Whether the interval after ``step`` trains with a focus: from the warm-up's end until
        the last cut (after it the network is at the budget)."""
        return self.warmup <= step < self.done and self.target < 1.0


@dataclass
class StrengthRecord:
    """One :meth:`StrengthController.update`: the measured active fraction, the curve's next
    target, and the strength before and after."""

    step: int
    active: float
    target: float
    strength: float
    new_strength: float


class StrengthController:
    r"""The strength of the focused receding penalty for the next step.

    It matches the *rate*: what must still recede by the next target against what receded
    during the last step::

        need   = max(0, active - target_at(step + 1))
        rate   = max(0, previous active - active)
        factor = clip((need + eps) / (rate + eps), max_decrease, max_increase)
        strength <- clip(strength * factor, min_strength, max_strength)

    No brake is needed: the focus bounds what can recede in one step. Deterministic; every
    update is in :attr:`history`.
    """

    def __init__(self, schedule: BudgetSchedule, *, max_increase: float = 2.0, max_decrease: float = 0.5,
                 eps: float = 1e-3, min_strength: float = 1e-4, max_strength: float = 10.0) -> None:
        checks = (("max_increase", max_increase, max_increase > 1),
                  ("max_decrease", max_decrease, 0 < max_decrease < 1),
                  ("eps", eps, eps > 0), ("min_strength", min_strength, min_strength > 0),
                  ("max_strength", max_strength, max_strength >= min_strength))
        for name, value, ok in checks:
            if not (is_number(value) and ok):
                raise ValueError(f"{name} is out of range: {value!r}")
        self.schedule = schedule
        self.max_increase, self.max_decrease, self.eps = float(max_increase), float(max_decrease), float(eps)
        self.min_strength, self.max_strength = float(min_strength), float(max_strength)
        self.history: list[StrengthRecord] = []

    def update(self, step: int, active: float, strength: float) -> float:
        """The strength for the interval after ``step``, given the active fraction measured after it."""
        previous = self.history[-1].active if self.history else 1.0
        target = self.schedule.target_at(step + 1)
        need = max(0.0, active - target)
        rate = max(0.0, previous - active)
        factor = min(self.max_increase, max(self.max_decrease, (need + self.eps) / (rate + self.eps)))
        new = min(self.max_strength, max(self.min_strength, strength * factor))
        self.history.append(StrengthRecord(step, float(active), target, float(strength), new))
        return new

    def state_dict(self) -> dict:
        return {"history": [asdict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [StrengthRecord(**r) for r in state["history"]]
