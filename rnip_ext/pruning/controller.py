"""Training to a FLOPs budget: adapt the regulariser's strength so the active FLOPs follow a schedule.

    ctrl = BudgetController(target_flops=0.05, by_epoch=20)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer, reg)
        f = active_flops(model, x0, threshold=0.01) / original_flops
        reg.strength = ctrl.update(epoch, f, reg.strength)

"Active" FLOPs are those of the network without its receded channels (importance below the
removal threshold): what the network would cost if :class:`~rnip_ext.pruning.RecedingSchedule`
removed them now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .plan import plan_from_keep

__all__ = ["BudgetController", "ControllerRecord", "active_flops"]

CURVES = ("linear", "geometric")


def active_flops(model: nn.Module, example_inputs, threshold: float = 0.01, min_channels: int = 3,
                 score: str = "relative") -> int:
    """MACs (for ``example_inputs``) of ``model`` without the channels a
    :class:`~rnip_ext.pruning.RecedingSchedule` with these settings would remove now."""
    from .schedule import RecedingSchedule

    masks = RecedingSchedule(example_inputs, threshold, min_channels, score=score).keep_masks(model)
    return plan_from_keep(model, masks, example_inputs=example_inputs).flops[1]


@dataclass
class ControllerRecord:
    """One :meth:`BudgetController.update`: inputs, the schedule's target and the new strength."""

    epoch: int
    active: float
    target: float
    strength: float
    new_strength: float
    braked: bool


class BudgetController:
    r"""Adapts the receding regulariser's strength once per epoch so that the active FLOPs
    fraction ``f`` follows a linear schedule to ``target_flops`` by ``by_epoch``.

    Schedule, with ``p = clip((e - start_epoch) / (by_epoch - start_epoch), 0, 1)``:
    ``curve="linear"`` (default) ``f*(e) = 1 - (1 - target) * p``; ``curve="geometric"``
    ``f*(e) = target ** p`` (the same *fraction* of the remaining FLOPs every epoch: a linear
    curve to 5% asks the last epoch to remove two thirds of what is left).

    Rule: the strength sets how fast channels recede (receding is hard to undo), so the
    controller matches the *rate*: what must still recede by the next epoch's target against
    what receded during the last epoch::

        need   = max(0, f_e - f*(e + 1))
        rate   = max(0, f_prev - f_e)                     (f_prev = 1 before the first update)
        factor = clip((need + eps) / (rate + eps), max_decrease, max_increase)
        if rate > max_drop:  factor = min(factor, brake)  # receding too fast: cut, whatever need says
        strength <- clip(strength * factor, min_strength, max_strength)

    Ahead of the schedule (``need`` small) the strength falls fast (down to ``max_decrease``
    per epoch) and at the target it decays towards ``min_strength``; behind it, it grows by at
    most ``max_increase`` per epoch. These caps and the brake are the guards against the
    collapse measured with a naive x1.3-per-epoch controller (38% of the channels receded in one
    epoch, training accuracy at chance): the receded fraction cannot run away. Deterministic:
    the output depends only on the sequence of inputs; every update is in :attr:`history`.
    """

    def __init__(self, target_flops: float, by_epoch: int, *, start_epoch: int = 0, max_increase: float = 1.5,
                 max_decrease: float = 0.25, max_drop: float = 0.1, brake: float = 0.5, eps: float = 1e-3,
                 min_strength: float = 1e-6, max_strength: float = 1.0, curve: str = "linear") -> None:
        if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not (
            0.0 < target_flops <= 1.0
        ):
            raise ValueError(f"target_flops must be a fraction in (0, 1], got {target_flops!r}")
        for name, value in (("by_epoch", by_epoch), ("start_epoch", start_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if by_epoch <= start_epoch:
            raise ValueError(f"by_epoch ({by_epoch}) must be after start_epoch ({start_epoch})")
        checks = (("max_increase", max_increase, max_increase > 1), ("max_decrease", max_decrease, 0 < max_decrease < 1),
                  ("max_drop", max_drop, 0 < max_drop <= 1), ("brake", brake, 0 < brake < 1), ("eps", eps, eps > 0),
                  ("min_strength", min_strength, 0 < min_strength),
                  ("max_strength", max_strength, min_strength <= max_strength))
        for name, value, ok in checks:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ValueError(f"{name} is out of range: {value!r}")
        if curve not in CURVES:
            raise ValueError(f"curve must be one of {CURVES}, got {curve!r}")
        self.curve = curve
        self.target_flops = float(target_flops)
        self.by_epoch = by_epoch
        self.start_epoch = start_epoch
        self.max_increase, self.max_decrease = float(max_increase), float(max_decrease)
        self.max_drop, self.brake, self.eps = float(max_drop), float(brake), float(eps)
        self.min_strength, self.max_strength = float(min_strength), float(max_strength)
        self.history: list[ControllerRecord] = []

    def target_at(self, epoch: int) -> float:
        """``f*(epoch)``: the active FLOPs fraction the schedule asks for after ``epoch``."""
        progress = min(1.0, max(0.0, (epoch - self.start_epoch) / (self.by_epoch - self.start_epoch)))
        if self.curve == "geometric":
            return self.target_flops ** progress
        return 1.0 - (1.0 - self.target_flops) * progress

    def update(self, epoch: int, active: float, strength: float) -> float:
        """The strength for the next epoch, given the active FLOPs fraction measured after ``epoch``."""
        if isinstance(active, bool) or not (isinstance(active, (int, float)) and 0.0 <= active <= 1.0 + 1e-9):
            raise ValueError(f"active must be a fraction in [0, 1], got {active!r}")
        if isinstance(strength, bool) or not (
            isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0
        ):
            raise ValueError(f"strength must be finite and >= 0, got {strength!r}")
        previous = self.history[-1].active if self.history else 1.0
        need = max(0.0, active - self.target_at(epoch + 1))
        rate = max(0.0, previous - active)
        factor = min(self.max_increase, max(self.max_decrease, (need + self.eps) / (rate + self.eps)))
        braked = rate > self.max_drop
        if braked:
            factor = min(factor, self.brake)
        new = min(self.max_strength, max(self.min_strength, strength * factor))
        self.history.append(ControllerRecord(epoch, float(active), self.target_at(epoch), float(strength), new, braked))
        return new

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(target_flops={self.target_flops}, by_epoch={self.by_epoch}, "
                f"start_epoch={self.start_epoch}, max_increase={self.max_increase}, "
                f"max_decrease={self.max_decrease}, max_drop={self.max_drop}, curve={self.curve!r})")
