"""Training to a FLOPs budget in one run: receded channels leave between epochs, no fine-tuning phase.

    best = rnip_ext.budget.train_to_budget(model, splits, "runs/b5", target_flops=0.05, epochs=30,
                                           example_inputs=torch.zeros(1, 1, 16, 16))
    small = best["model"]                      # the final, narrowed network (<= 5% of the MACs)

The pieces: :class:`rnip_ext.RecedingRegularizer` focused (:meth:`~rnip_ext.RecedingRegularizer.focus`)
on the channels the budget planner would remove next, :class:`rnip_ext.pruning.BudgetController`
(adapts the strength once per epoch so the active FLOPs follow a geometric schedule to the
target), :class:`rnip_ext.pruning.RecedingSchedule` (removes channels whose importance fell below
the threshold, and cuts to the budget exactly with the planner), all driven from
:func:`rnip_ext.training.fit`'s ``on_epoch_end`` by :class:`BudgetPruning`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .nn import BoundedBatchNorm2d
from .pruning.controller import BudgetController, ControllerRecord, active_flops
from .pruning.flops import count_flops, count_params
from .pruning.plan import SCOPES
from .pruning.schedule import RecedingSchedule

__all__ = ["BUDGET_SHIFT", "BUDGET_START_STRENGTH", "BudgetPruning", "BudgetSchedule", "StrengthController", "StrengthRecord",
           "check_budget", "check_target", "train_to_budget"]


# Defaults of a focused budget run, chosen on the validation split of the digits
# (benchmarks/budget_training.py; the choice is documented in BudgetPruning).
WARMUP_EPOCHS = 2
SETTLE_EPOCHS = 2
BUDGET_START_STRENGTH = 2.0
BUDGET_SHIFT = 1.0
FOCUSED_MAX_STRENGTH = 10.0


def check_budget(model: nn.Module, target_flops: float, example_inputs, *, threshold: float = 0.01,
                 min_channels: int = 3, scope: str = "local") -> None:
    """``ValueError`` naming the problem for a target outside (0, 1], a threshold outside (0, 1),
    or a budget that ``min_channels`` makes unreachable for ``model`` (the budget planner's
    message, naming the smallest reachable fraction). Nothing is changed."""
    from .pruning.plan import plan

    RecedingSchedule(example_inputs, threshold, min_channels)  # threshold, min_channels
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not (
        0.0 < target_flops <= 1.0
    ):
        raise ValueError(f"target_flops must be a fraction in (0, 1], got {target_flops!r}")
    plan(model, target_flops=float(target_flops), scope=scope, min_channels=min_channels,
         example_inputs=example_inputs)


class BudgetPruning:
    """The :func:`rnip_ext.training.fit` ``on_epoch_end`` callback that trains to a FLOPs budget.

    After each epoch ``e`` (1-based) of ``epochs``:

    1. ``active`` = MACs of the network without its receded channels (importance below
       ``threshold``, :func:`rnip_ext.pruning.active_flops`) / the original network's MACs;
    2. the regulariser's strength for the next epoch is ``controller.update(e - 1, active,
       strength)`` (:class:`~rnip_ext.pruning.BudgetController`, schedule reaching
       ``target_flops`` at epoch ``by_epoch = clip(round(budget_at * epochs), 1, epochs - 1)``);
    3. every ``prune_every`` epochs the receded channels are removed
       (:meth:`RecedingSchedule.step`), the optimiser rebound in place;
    4. from epoch ``cut_epoch = min(by_epoch + settle, epochs - 1)`` on,
       :meth:`RecedingSchedule.enforce_budget` cuts to the budget exactly (the lowest-ranked
       remaining channels, by the planner with ``scope``; a no-op once met), so the last
       ``epochs - cut_epoch`` epochs train the network at its final size; the ``settle`` epochs
       between the schedule's end and the cut let the last focused channels recede, so the
       cut removes little that still carries signal;
    5. with ``focus=True`` (default) the regulariser is focused (:meth:`RecedingRegularizer.focus
       <rnip_ext.RecedingRegularizer.focus>`) on the channels the budget planner (``scope``)
       would remove to bring the network to the schedule's target one epoch ahead,
       ``controller.target_at(e + 1)`` (receding takes about an epoch); only those recede, so
       the channels that stay are not shrunk with them. :meth:`prepare` sets the first focus
       before training.

    Decisions, from the digits benchmark (``benchmarks/budget_training.py``, 30 epochs, 3 seeds,
    judged on the validation split): an unfocused penalty recedes whatever is cheapest to recede
    -- in the measured runs 45% of the FLOPs in one epoch, then almost nothing for ten, leaving
    the final cut to the ranking -- while the focused one follows the schedule. ``scope="local"``
    (default) ranks channels within each layer and removes the same fraction everywhere (the
    smallest uniform fraction meeting the target): at 2-5% of the FLOPs the global ranking of
    layer-relative scores thinned the first layers to ``min_channels`` and the network
    underfitted. The budget is reached at a third of the epochs (``budget_at=1/3``), so the final
    network still trains at the full learning rate before the paper's schedule divides it by 10
    at half the epochs (at ``budget_at=0.5`` it recovers from the last cut at lr / 10 only).
    The exact cut comes ``settle`` (2) epochs after the schedule's end: cutting right at it
    cost 10-53 points of test accuracy at the cut (BatchNorm statistics re-estimated, no
    training in between; receding lags the schedule by about an epoch), 2 settling epochs
    0-7 points and slightly better validation accuracy than 3 or 4. ``warmup`` (2) epochs
    train at full width before anything is focused (the ranking of an
    untrained network is noise); from there the schedule is geometric (the same fraction of the
    remaining FLOPs per epoch). The focused controller starts at ``strength`` 2.0
    (:data:`BUDGET_START_STRENGTH`; the focus bounds what can recede, so strengths far above an
    unfocused penalty's are safe) and may double or halve it per epoch, up to 10, without a
    brake. Unfocused (``focus=False``), the controller keeps its defaults (at most x1.5 per
    epoch up, x0.25 down, braked by x0.5 when more than 10% of the FLOPs receded in one epoch).
    Each epoch's metrics row gets ``params``, ``flops``,
    ``flops_fraction`` (of the original), ``channels`` (``{BatchNorm name: width}``),
    ``strength`` (used in the epoch), ``next_strength``, ``active_flops_fraction``,
    ``flops_schedule`` (the controller's target after the epoch), ``removed`` (channels
    removed after the epoch) and ``focused`` (channels the penalty acts on next epoch).
    :meth:`state_dict`/:meth:`load_state_dict` carry the original FLOPs and the controller's
    history across a resume (:func:`fit` stores them in ``last.pt``; the regulariser's focus is
    stored with the regulariser). :attr:`model` is the latest model the callback left.
    """

    def __init__(self, example_inputs, target_flops: float, epochs: int, *, prune_every: int = 1,
                 threshold: float = 0.01, min_channels: int = 3, budget_at: float = 1 / 3,
                 controller: BudgetController | None = None, scope: str = "local", focus: bool = True,
                 warmup: int = WARMUP_EPOCHS, settle: int = SETTLE_EPOCHS) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
            raise ValueError(f"epochs must be an int >= 2 (the budget is enforced after an epoch and at least one "
                             f"epoch trains the network at its budget), got {epochs!r}")
        if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
            raise ValueError(f"prune_every must be an int >= 1, got {prune_every!r}")
        if isinstance(budget_at, bool) or not isinstance(budget_at, (int, float)) or not 0.0 < budget_at <= 1.0:
            raise ValueError(f"budget_at must be a fraction of the epochs in (0, 1], got {budget_at!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (epochs at full width before channels recede), got {warmup!r}")
        self.schedule = RecedingSchedule(example_inputs, threshold, min_channels, every=prune_every,
                                         start=prune_every - 1)
        # At least one epoch trains at the budget, so best.pt (chosen among in-budget epochs) exists.
        if isinstance(settle, bool) or not isinstance(settle, int) or settle < 0:
            raise ValueError(f"settle must be an int >= 0 (epochs between the schedule's end and the exact cut), "
                             f"got {settle!r}")
        self.by_epoch = max(1, min(epochs - 1, round(budget_at * epochs)))
        self.cut_epoch = min(epochs - 1, self.by_epoch + settle)
        if controller is None:
            if focus:
                # The focus bounds what can recede in an epoch, so no brake is needed, and the
                # strength may go far higher than an unfocused penalty could take.
                controller = BudgetController(target_flops, self.by_epoch, start_epoch=min(warmup, self.by_epoch - 1),
                                              curve="geometric", max_increase=2.0, max_decrease=0.5, max_drop=1.0,
                                              max_strength=FOCUSED_MAX_STRENGTH)
            else:
                controller = BudgetController(target_flops, self.by_epoch)
        self.controller = controller
        self.target_flops = self.controller.target_flops
        self.example_inputs = example_inputs
        self.epochs = epochs
        self.scope = scope
        self.focus = bool(focus)
        self.model: nn.Module | None = None

    def prepare(self, model: nn.Module, regularizer) -> None:
        """Before the first epoch: record the original FLOPs and set the first focus."""
        if self.schedule.original_flops is None:
            self.schedule.original_flops = count_flops(model, self.example_inputs)
        self.focus_regularizer(model, regularizer, 0)

    def focus_masks(self, model: nn.Module, epochs_done: int) -> dict:
        """``{BatchNorm name: bool mask}`` of the channels the planner (``scope``) would remove
        from ``model`` to meet ``controller.target_at(epochs_done + 1)`` (all ``False`` where
        nothing goes, or when ``model`` already meets it)."""
        target = min(1.0, max(self.target_flops, self.controller.target_at(epochs_done + 1)))
        p = self.schedule.budget_plan(model, target, self.scope)
        masks = {}
        for name, m in model.named_modules():
            if isinstance(m, BoundedBatchNorm2d) and m.weight is not None:
                mask = torch.zeros(m.num_features, dtype=torch.bool)
                if p is not None and name in p.keep:
                    mask[:] = True
                    mask[p.keep[name]] = False
                masks[name] = mask
        return masks

    def focus_regularizer(self, model: nn.Module, regularizer, epochs_done: int) -> int:
        """Focus ``regularizer`` (when ``focus`` and it can) on :meth:`focus_masks`; returns the
        number of channels it now acts on (``-1``: not focused, every channel)."""
        if not self.focus or regularizer is None or not callable(getattr(regularizer, "focus", None)):
            return -1
        masks = self.focus_masks(model, epochs_done)
        regularizer.focus(masks)
        return int(sum(int(m.sum()) for m in masks.values()))

    @property
    def original_flops(self) -> int | None:
        """MACs of the network before any channel left (set at the first call)."""
        return self.schedule.original_flops

    def within_budget(self, model: nn.Module) -> bool:
        """Whether ``model`` meets the budget (``fit``'s ``selectable``: only such epochs become best.pt)."""
        if self.original_flops is None:
            return False
        return count_flops(model, self.example_inputs) <= self.target_flops * self.original_flops

    def __call__(self, state) -> None:
        model, reg = state.model, state.regularizer
        model_in = model
        if self.schedule.original_flops is None:
            self.schedule.original_flops = count_flops(model, self.example_inputs)
        original = self.schedule.original_flops
        epoch = state.epoch - 1  # the controller and the schedule count from 0
        active = active_flops(model, self.example_inputs, self.schedule.threshold, self.schedule.min_channels,
                              self.schedule.score) / original
        used = float(reg.strength) if reg is not None else None
        if reg is not None:
            reg.strength = self.controller.update(epoch, min(active, 1.0), reg.strength)
        else:
            self.controller.update(epoch, min(active, 1.0), 0.0)
        # fit rebinds the regulariser once the model changed: not here too.
        removed = 0
        step = self.schedule.step(epoch, model, state.optimizer)
        model, removed = step.model, removed + step.n_removed
        if state.epoch >= self.cut_epoch:
            step = self.schedule.enforce_budget(epoch, model, self.target_flops, state.optimizer, scope=self.scope)
            model, removed = step.model, removed + step.n_removed
        state.model = model
        self.model = model
        if self.focus and reg is not None and model is not model_in and callable(getattr(reg, "rebind", None)):
            # The focus names the new model's layers: bind them first. fit rebinds again after
            # this returns; the focus survives that (same names and widths).
            reg.rebind(model)
        focused = self.focus_regularizer(model, reg, state.epoch)
        flops = count_flops(model, self.example_inputs)
        state.metrics.update(
            params=count_params(model), flops=flops, flops_fraction=flops / original,
            channels={n: m.num_features for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d)},
            strength=used, next_strength=float(reg.strength) if reg is not None else None,
            active_flops_fraction=active, flops_schedule=self.controller.target_at(state.epoch), removed=removed, focused=focused,
        )

    def state_dict(self) -> dict:
        """Plain values (loadable with ``weights_only=True``): original FLOPs and the controller's history."""
        return {"original_flops": self.schedule.original_flops,
                "history": [asdict(r) for r in self.controller.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""
        self.schedule.original_flops = state["original_flops"]
        self.controller.history = [ControllerRecord(**r) for r in state["history"]]


def train_to_budget(model: nn.Module, splits, out, *, target_flops: float, epochs: int, example_inputs,
                    strength: float = BUDGET_START_STRENGTH, shift: float = BUDGET_SHIFT, prune_every: int = 1,
                    threshold: float = 0.01,
                    min_channels: int = 3, budget_at: float = 1 / 3, resume_from: dict | None = None,
                    normalize: str | None = "layer", scope: str = "local", focus: bool = True,
                    cost: str | None = None, controller: BudgetController | None = None,
                    callback: BudgetPruning | None = None, **fit_kwargs) -> dict:
    """Train ``model`` to ``target_flops`` of its MACs in one :func:`rnip_ext.training.fit` run.

    The regulariser is ``RecedingRegularizer(model, strength, shift, cost="flops",
    example_inputs=example_inputs, normalize=normalize)`` (``strength`` is where the controller starts); the callback
    is :class:`BudgetPruning` (see it for the schedule, ``scope``, ``focus`` and the metrics;
    a fresh run is focused before its first epoch; ``callback`` replaces the one built from the
    arguments, e.g. a subclass that also logs or evaluates); ``best.pt`` is the
    best-validation epoch among those whose network meets the budget. Bad input
    (:func:`check_budget`) raises ``ValueError`` before anything is written. ``fit_kwargs`` go
    to :func:`fit` (``lr``, ``batch_size``, ``seed``, ``amp``, ``compile``, ``dist_ctx``, ...).

    Returns :func:`fit`'s ``{"val_accuracy", "epoch", "test_accuracy"}`` plus ``"model"`` (the
    final narrowed network), ``"flops"``, ``"params"``, ``"flops_fraction"`` and
    ``"original_flops"``.
    """
    from .regularizers import RecedingRegularizer
    from .training import fit

    check_budget(model, target_flops, example_inputs, threshold=threshold, min_channels=min_channels, scope=scope)
    if callback is None:
        callback = BudgetPruning(example_inputs, target_flops, epochs, prune_every=prune_every, threshold=threshold,
                                 min_channels=min_channels, budget_at=budget_at, scope=scope, focus=focus,
                                 controller=controller)
    elif not isinstance(callback, BudgetPruning):
        raise TypeError(f"callback must be a BudgetPruning (or a subclass), got {type(callback).__name__}")
    if cost is None:
        cost = "channels" if callback.focus else "flops"
    reg = RecedingRegularizer(model, strength, shift, cost=cost, example_inputs=example_inputs,
                              normalize=normalize)
    if resume_from is None:
        callback.prepare(model, reg)
    best = fit(model, splits, out, epochs=epochs, regularizer=reg, resume_from=resume_from, on_epoch_end=callback,
               selectable=callback.within_budget, **fit_kwargs)
    final = callback.model if callback.model is not None else model
    flops = count_flops(final, example_inputs)
    return dict(best, model=final, flops=flops, params=count_params(final),
                flops_fraction=flops / callback.original_flops, original_flops=callback.original_flops)


# -- BudgetPruner's parts ---------------------------------------------------------------------

COSTS = ("flops", "params")
# Where BudgetPruner's controller starts, and its cap, per update mode.
START_STRENGTH = {"decoupled": 20.0, "loss": 2.0}
MAX_STRENGTH = {"decoupled": 200.0, "loss": 10.0}


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_target(target_flops=None, target_params=None) -> tuple[str, float]:
    """``(cost, fraction)`` of a budget: exactly one of ``target_flops`` (fraction of the
    multiply-accumulates kept) and ``target_params`` (fraction of the parameters kept), in
    (0, 1]; ``ValueError`` naming the problem otherwise."""
    given = [(k, v) for k, v in (("flops", target_flops), ("params", target_params)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one budget: target_flops= (fraction of the FLOPs kept) or target_params= "
                         f"(fraction of the parameters kept), got {len(given)}")
    kind, value = given[0]
    if not _is_number(value) or not 0.0 < value <= 1.0:
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
        if not _is_number(target) or not 0.0 < target <= 1.0:
            raise ValueError(f"the target must be a fraction in (0, 1], got {target!r}")
        _check_int("the number of steps (epochs, or steps // every)", steps, 2)
        _check_int("warmup", warmup, 0)
        _check_int("settle", settle, 0)
        if not _is_number(budget_at) or not 0.0 < budget_at <= 1.0:
            raise ValueError(f"budget_at must be a fraction of the run in (0, 1], got {budget_at!r}")
        if not _is_number(max_step_removal) or not 0.0 < max_step_removal < 1.0:
            raise ValueError(f"max_step_removal must be a fraction in (0, 1), got {max_step_removal!r}")
        k = 1 if target == 1.0 else max(1, math.ceil(math.log(target) / math.log1p(-max_step_removal) - 1e-9))
        last = steps - 1  # the budget is met at a step < steps: one interval trains at it
        w = min(warmup, last - k)
        if w < min_warmup:
            need = min_warmup + k + 1
            raise ValueError(
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
        checks = (("max_increase", max_increase, max_increase > 1), ("max_decrease", max_decrease, 0 < max_decrease < 1),
                  ("eps", eps, eps > 0), ("min_strength", min_strength, min_strength > 0),
                  ("max_strength", max_strength, max_strength >= min_strength))
        for name, value, ok in checks:
            if not (_is_number(value) and ok):
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
