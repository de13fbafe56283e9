"""Removing receded channels during training: a schedule that prunes between epochs.

    schedule = RecedingSchedule(example_inputs=torch.randn(1, 3, 32, 32), threshold=0.01)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer, reg)
        step = schedule.step(epoch, model, optimizer, reg)
        model = step.model          # narrower when channels left; optimizer and reg rebound in place

A channel leaves when its importance (:func:`rnip_ext.pruning.channel_importance`, the
layer-relative score by default) is below ``threshold``: with the default 0.01 it carries less
than 1% of the signal of its layer's strongest channel (or, where nothing renormalises, less
than 1% of its normalised activation). Removing it changes the function by that little, so the
run goes on without a fine-tuning phase. The optimiser comes along (:func:`apply` slices its
state) and a regulariser is rebound to the narrower network. The BatchNorms' running
statistics were measured with the removed channels present: the next training epoch
re-estimates them; to evaluate right after a step (or after the final cut) call
:func:`rnip_ext.pruning.recalibrate_batchnorm` on a few training batches first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .apply import apply
from .flops import count_flops
from .graph import find_channel_groups
from .importance import SCORES, group_scores
from .plan import PruningPlan, plan_from_keep

__all__ = ["RecedingSchedule", "ScheduleStep"]


@dataclass
class ScheduleStep:
    """What one :meth:`RecedingSchedule.step` did.

    Attributes:
        epoch: the epoch it was called for.
        removed: ``{group name: removed channel indices}``, indexed in the model passed in
            (empty when nothing left).
        model: the model to go on with: the narrower copy, or the same object when nothing left.
        optimizer: the optimiser passed in (rebound in place to ``model``), or ``None``.
        plan: the :class:`PruningPlan` applied, or ``None``.
    """

    epoch: int
    removed: dict[str, Tensor] = field(default_factory=dict)
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    plan: PruningPlan | None = None

    @property
    def n_removed(self) -> int:
        """Number of channels removed (over all groups)."""
        return sum(len(v) for v in self.removed.values())


class RecedingSchedule:
    """Removes channels whose importance fell below ``threshold`` every ``every`` epochs from ``start``.

    Args:
        example_inputs: an input (or tuple) for tracing and FLOP counting, e.g.
            ``torch.randn(1, 3, 32, 32)``; given once.
        threshold: a channel with importance ``< threshold`` leaves; in (0, 1); default 0.01.
        min_channels: every layer keeps at least ``min(min_channels, its channels)``: the
            best-scored ones when more would fall below the threshold.
        every, start: prune at epochs ``start, start + every, ...``.
        score: the importance (``"relative"``, default, or ``"paper"``; see
            :mod:`rnip_ext.pruning.importance`).

    Errors: ``ValueError`` for a threshold outside (0, 1), ``min_channels < 1``, ``every < 1``,
    ``start < 0``; a regulariser without ``rebind`` is a ``TypeError`` before anything changes.
    """

    def __init__(self, example_inputs, threshold: float = 0.01, min_channels: int = 3, *, every: int = 1,
                 start: int = 0, score: str = "relative") -> None:
        if example_inputs is None:
            raise ValueError("example_inputs is required: pass e.g. torch.randn(1, 3, 32, 32)")
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                or not (0.0 < threshold < 1.0)):
            raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
        for name, value, low in (("min_channels", min_channels, 1), ("every", every, 1), ("start", start, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.example_inputs = example_inputs
        self.threshold = float(threshold)
        self.min_channels = min_channels
        self.every = every
        self.start = start
        self.score = score
        self.original_flops: int | None = None

    def due(self, epoch: int) -> bool:
        """Whether :meth:`step` prunes at ``epoch``."""
        return epoch >= self.start and (epoch - self.start) % self.every == 0

    def keep_masks(self, model: nn.Module) -> dict[str, Tensor]:
        """Per channel group, the boolean mask of channels that stay: importance >= threshold,
        topped up to ``min_channels`` with the best-scored channels (ties by position)."""
        groups = find_channel_groups(model, self.example_inputs)
        scores = group_scores(model, groups, self.score)
        masks = {}
        for g in groups:
            s = scores[g.name]
            mask = s >= self.threshold
            short = min(self.min_channels, g.channels) - int(mask.sum())
            if short > 0:
                best = torch.argsort(s, descending=True, stable=True)
                mask[best[: min(self.min_channels, g.channels)]] = True
            masks[g.name] = mask
        return masks

    def step(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             regularizer=None) -> ScheduleStep:
        """At a due epoch, remove every channel below the threshold (see :meth:`keep_masks`).

        The model passed in is left untouched; the returned :class:`ScheduleStep` holds the
        model to go on with. ``optimizer`` is rebound in place to it (state sliced, see
        :func:`rnip_ext.pruning.apply`) and ``regularizer.rebind(new_model)`` is called.
        """
        self._check_regularizer(regularizer)
        if self.original_flops is None:
            self.original_flops = count_flops(model, self.example_inputs)
        if not self.due(epoch):
            return ScheduleStep(epoch, {}, model, optimizer, None)
        masks = self.keep_masks(model)
        if all(bool(m.all()) for m in masks.values()):
            return ScheduleStep(epoch, {}, model, optimizer, None)
        p = plan_from_keep(model, {n: m for n, m in masks.items() if not m.all()},
                           example_inputs=self.example_inputs)
        return self._apply(epoch, model, p, optimizer, regularizer)

    def _apply(self, epoch, model, p: PruningPlan, optimizer, regularizer) -> ScheduleStep:
        removed = {}
        for g in p.groups:
            mask = torch.ones(g.channels, dtype=torch.bool)
            mask[p.group_keep[g.name]] = False
            if mask.any():
                removed[g.name] = mask.nonzero().flatten()
        new_model = apply(model, p, optimizer=optimizer)
        if regularizer is not None:
            regularizer.rebind(new_model)
        return ScheduleStep(epoch, removed, new_model, optimizer, p)

    @staticmethod
    def _check_regularizer(regularizer) -> None:
        if regularizer is not None and not callable(getattr(regularizer, "rebind", None)):
            raise TypeError(f"{type(regularizer).__name__} cannot follow a pruned model (it has no rebind); "
                            "pass a RecedingRegularizer or none")

    # -- the final budget ------------------------------------------------------------------
    # Relies on rnip_ext.pruning.plan(model, target_flops=..., example_inputs=...), the budget
    # planner (one budget planner in the project, not a second one here).

    def budget_plan(self, model: nn.Module, target_flops: float, scope: str = "global") -> PruningPlan | None:
        """The budget planner's plan that brings ``model`` to ``target_flops`` (a fraction of the
        FLOPs at this schedule's first :meth:`step`, or of the current model's), or ``None`` when
        the model already meets it. ``scope="global"`` removes the shortest prefix of the global
        ascending-importance order; ``"local"`` the smallest uniform per-layer fraction (see
        :func:`rnip_ext.pruning.plan`). Nothing is changed."""
        from .plan import plan

        if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not (
            0.0 < target_flops <= 1.0
        ):
            raise ValueError(f"target_flops must be a fraction in (0, 1], got {target_flops!r}")
        current = count_flops(model, self.example_inputs)
        original = self.original_flops if self.original_flops is not None else current
        budget = target_flops * original
        fraction = budget / current
        # The planner checks ``after <= fraction * current``; make that product not exceed the
        # budget in floating point, so "meets the budget" holds against the original's count too.
        while fraction * current > budget:
            fraction = math.nextafter(fraction, 0.0)
        if fraction >= 1.0 or math.isclose(fraction, 1.0):
            return None
        return plan(model, target_flops=fraction, scope=scope, min_channels=self.min_channels,
                    example_inputs=self.example_inputs)

    def enforce_budget(self, epoch: int, model: nn.Module, target_flops: float,
                       optimizer: torch.optim.Optimizer | None = None, regularizer=None, *,
                       scope: str = "global") -> ScheduleStep:
        """Remove the lowest-ranked remaining channels so that the model meets ``target_flops``
        exactly, a fraction in (0, 1] of the FLOPs the model had at this schedule's first
        :meth:`step` (or of the current model's if :meth:`step` was never called).

        The budget planner receives the equivalent fraction of the *current* model's FLOPs
        (rounded down by ulps so that ``after <= target_flops * original`` holds in floating
        point), so the channels go by the planner's global ranking: the shortest prefix of the
        ascending-score order that meets the budget, each layer keeping ``min_channels``. When
        the model already meets the budget nothing is removed. An unreachable budget raises the
        planner's ``ValueError`` before the model, optimiser or regulariser change.
        ``scope="local"`` cuts by the smallest uniform per-layer fraction instead (see
        :meth:`budget_plan`).
        """
        self._check_regularizer(regularizer)
        p = self.budget_plan(model, target_flops, scope)
        if p is None:
            return ScheduleStep(epoch, {}, model, optimizer, None)
        return self._apply(epoch, model, p, optimizer, regularizer)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(threshold={self.threshold}, min_channels={self.min_channels}, "
                f"every={self.every}, start={self.start}, score={self.score!r})")
