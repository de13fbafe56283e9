"""Budget-aware receding in any training loop: :class:`BudgetPruner`.

    pruner = rnip_ext.BudgetPruner(model, example_inputs, target_flops=0.1, epochs=30)
    for epoch in range(30):
        for x, y in loader:
            loss = criterion(model(x), y) + pruner.penalty()
            optimizer.zero_grad(); loss.backward(); optimizer.step(); scheduler.step()
        pruner.step(optimizer, scheduler=scheduler)   # may narrow `model` in place

Each step (the end of an epoch, or every ``every`` optimiser steps): channels whose importance
fell below ``threshold`` leave; the network is cut to the schedule's curve
(:class:`rnip_ext.budget.BudgetSchedule`) ``settle`` steps behind it; the receding penalty is
focused on the channels the budget planner would remove next, and its strength adapted
(:class:`rnip_ext.budget.StrengthController`). The model is narrowed **in place**
(:func:`rnip_ext.pruning.apply` with ``inplace=True``): the same module and parameter objects, the
optimiser's state sliced, so schedulers, a ``GradScaler``, ``torch.compile`` wrappers and your
references keep working. EMA copies passed to :meth:`BudgetPruner.step` are narrowed alike. A
``DistributedDataParallel`` wrapper must be rebuilt after a step that changed the network
(:attr:`PruneStep.changed`): it keeps per-parameter gradient buckets of the old shapes.
"""

from __future__ import annotations

import json
import math
import warnings
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from . import pruning
from ._validation import check_int, is_int, is_number
from .budget import BUDGET_SHIFT, MAX_STRENGTH, START_STRENGTH, BudgetSchedule, StrengthController, check_budget
from .nn import BoundedBatchNorm2d
from .pruning.apply import replace_data
from .pruning.graph import check_residual_streams
from .pruning.latency_plan import check_latency_budget, check_latency_rule, latency_table_for, refuse_latency_options
from .pruning.rounding import check_round_to
from .pruning.se import check_se_ratio
from .regularizers import RecedingRegularizer

__all__ = ["BudgetPruner", "PruneStep", "RecedingLagWarning", "UPDATES", "narrow_to", "unwrap_model"]

UPDATES = ("decoupled", "loss")
FORMAT = "rnip_ext.budget_pruner/1"


class RecedingLagWarning(UserWarning):
    """Channels do not recede as fast as the budget schedule needs: the next cut removes channels
    that still carry signal."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel``/``DataParallel`` or ``torch.compile`` wrapper trains."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _ema_module(ema) -> nn.Module:
    """The averaged copy inside ``torch.optim.swa_utils.AveragedModel`` / timm's ``ModelEma*`` (``.module``)."""
    inner = getattr(ema, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    if isinstance(ema, nn.Module):
        return ema
    raise TypeError(f"ema must be an nn.Module (an AveragedModel, a timm ModelEma or a copy), got {type(ema).__name__}")


def _shapes(model: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


@dataclass
class PruneStep:
    """What one :meth:`BudgetPruner.step` did (``cost`` is FLOPs or parameters, as the budget's).

    ``active``: the cost fraction of the network without its receded channels, measured before
    anything left; ``fraction``: the network's cost fraction after the step; ``target``: the
    schedule's curve after it; ``strength``: the strength the interval trained with,
    ``next_strength`` the next one's; ``removed``: channels removed, ``forced`` of them not yet
    receded (cut by the schedule); ``focused``: channels the penalty acts on next;
    ``changed``: whether the network's shape changed (rebuild a DDP wrapper then);
    ``se_removed``: squeeze-and-excitation inner channels removed (``se_ratio``, first step
    only; not in ``removed``).
    """

    step: int
    steps: int
    cost: str
    fraction: float
    active: float
    target: float
    strength: float
    next_strength: float
    removed: int
    forced: int
    focused: int
    changed: bool
    flops: int
    flops_fraction: float
    params: int
    channels: dict
    se_removed: int = 0  # a default: histories saved before se_ratio existed still load

    def metrics(self) -> dict:
        """The keys a metrics row of the project's trainer gets (``metrics.jsonl``)."""
        return {"params": self.params, "flops": self.flops, "flops_fraction": self.flops_fraction,
                f"{self.cost}_fraction": self.fraction, f"active_{self.cost}_fraction": self.active,
                f"{self.cost}_schedule": self.target,
                "strength": self.strength, "next_strength": self.next_strength, "removed": self.removed,
                "forced": self.forced, "focused": self.focused, "se_removed": self.se_removed,
                "channels": self.channels}


class BudgetPruner:
    """Trains a network down to a FLOPs or parameter budget in one run, in any training loop.

    Args:
        model: the network (bounded BatchNorms, :func:`rnip_ext.convert_batchnorm`); a DDP or
            ``torch.compile`` wrapper is unwrapped. It is narrowed in place.
        example_inputs: an input (or tuple) of the size costs are counted for.
        target_flops / target_params: the fraction of the FLOPs (multiply-accumulates) or of
            the parameters to keep, in (0, 1]; or ``target_latency`` (a fraction in (0, 1] of the
            unpruned network's measured latency) / ``max_latency`` (seconds per forward pass of
            ``example_inputs``): the latency predicted by ``latency_table`` (a
            :class:`~rnip_ext.pruning.latency.LatencyTable`, the path of a saved one, or measured
            at construction when ``None``), cuts chosen by the latency knapsack
            (:func:`rnip_ext.pruning.latency_plan.plan_to_latency`, without the refining timings),
            or by one global score threshold with ``latency_rule="threshold"``; exactly one budget
            (``latency_table`` and ``latency_rule`` only with a latency budget).
        round_to: every layer the pruner narrows keeps a multiple of it or all its channels
            (cuts round to the nearest, removals of receded channels round up: the best-scored
            receded channels stay).
        epochs: call :meth:`step` once per epoch, ``epochs`` times; or ``steps`` and ``every``:
            the run has ``steps`` optimiser steps and :meth:`step` comes every ``every`` of them.
        optimizer: the optimiser training ``model``; may instead be given to the first
            :meth:`step`. Binding it here lets the decoupled update start in the first interval.
        update: how the focused channels recede. ``"decoupled"`` (default): after every
            optimiser step the focused logits move by ``-(strength / S) * d(penalty)/d(logit)``,
            ``S`` the optimiser steps per interval, outside the optimiser (as AdamW decouples
            weight decay), so receding is the same under SGD, Adam or anything else;
            :meth:`penalty` is then zero. ``"loss"``: the paper's
            way, ``penalty()`` is added to the loss and the optimiser moves the logits (works
            with SGD; under Adam a step moves a logit by about the learning rate whatever the
            penalty's scale, so the strength cannot control receding: a warning says so).
        strength, shift: where the controller starts (default per ``update``:
            :data:`rnip_ext.budget.START_STRENGTH`) and the penalty's shift;
            ``max_strength`` its cap (:data:`rnip_ext.budget.MAX_STRENGTH`).
        threshold: a channel whose importance (:func:`rnip_ext.pruning.channel_importance`) is
            below it has receded and leaves at the next step; ``min_channels``: every layer keeps
            at least that many.
        scope: how the planner ranks channels for the focus and the cut: ``"local"`` (the same
            fraction of every layer) or ``"global"``.
        budget_at, warmup, settle, max_step_removal: the schedule
            (:meth:`rnip_ext.budget.BudgetSchedule.make`); ``lag_tolerance``: warn when a cut
            removes more than this share of the network's cost in channels not yet receded.
        residual_streams: ``True`` prunes residual streams too, each as one channel group (see
            :func:`rnip_ext.pruning.plan`; a latency table must be built so); ``False`` (default)
            keeps them whole, as the paper does.
        se_ratio: the fraction, in [0, 1), of each squeeze-and-excitation block's inner width
            (the reducing conv's outputs, the expanding conv's inputs; see
            :func:`rnip_ext.pruning.plan`) to remove, per block, of its *original* width:
            ``floor(se_ratio * width)`` channels, the lowest by their gain through the bottleneck,
            each block keeping ``min(min_channels, width)`` (with ``round_to``: the kept count
            rounded up to a multiple of it or the whole width). These channels have no BatchNorm,
            so they cannot recede: they all go at the first :meth:`step` (counted in
            :attr:`PruneStep.se_removed`) and are not cut again. The budget counts that cut from
            the start (the constructor's check, the focus before the first step, every cut), so
            the network still ends at the budget, its other layers keeping what the SE cut saved.
            Not with a latency budget (``ValueError``). Default 0: the blocks stay whole.

    Use: add :meth:`penalty` to the loss every step (required with ``update="loss"``), call
    :meth:`step` after each interval; :meth:`state_dict` / :meth:`load_state_dict` for
    checkpoints (load before the model's own state: it narrows a fresh model first).
    Misuse (another model's optimiser, a model changed behind the pruner's back, a step without
    training, too many steps) raises a ``ValueError``/``RuntimeError`` saying what to do.
    """

    def __init__(self, model: nn.Module, example_inputs, *, target_flops: float | None = None,
                 target_params: float | None = None, target_latency: float | None = None,
                 max_latency: float | None = None, latency_table=None, latency_rule: str = "knapsack",
                 round_to: int | None = None, epochs: int | None = None, steps: int | None = None,
                 every: int | None = None, optimizer: torch.optim.Optimizer | None = None,
                 update: str = "decoupled", strength: float | None = None, shift: float = BUDGET_SHIFT,
                 max_strength: float | None = None, threshold: float = 0.01, min_channels: int = 3,
                 scope: str = "local", budget_at: float = 1 / 3, warmup: int = 2, settle: int = 2,
                 max_step_removal: float = 0.5, lag_tolerance: float = 0.1, residual_streams: bool = False,
                 se_ratio: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if example_inputs is None:
            raise ValueError("example_inputs is required: an input of the size costs are counted for, "
                             "e.g. torch.zeros(1, 3, 32, 32)")
        latency = target_latency is not None or max_latency is not None
        self.residual_streams = check_residual_streams(residual_streams)
        self.se_ratio = check_se_ratio(se_ratio)
        if latency:
            if target_flops is not None or target_params is not None:
                raise ValueError("give exactly one budget: a latency budget and target_flops/target_params were given")
            if self.se_ratio > 0:  # as plan() refuses it, before a latency table is measured
                raise ValueError("se_ratio is not supported with a latency budget (target_latency/max_latency) yet")
            latency_kind, self.target = check_latency_budget(target_latency, max_latency)
            check_latency_rule(latency_rule, "latency_rule")
            self.cost = "latency"
        else:
            self.cost, self.target = check_budget(target_flops, target_params)
            refuse_latency_options(latency_table, latency_rule)
        self.latency_rule = latency_rule
        self.round_to = check_round_to(round_to)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if not (is_number(threshold) and 0 < threshold < 1):
            raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
        check_int("min_channels", min_channels, 1)
        if not (is_number(lag_tolerance) and 0 <= lag_tolerance <= 1):
            raise ValueError(f"lag_tolerance must be a fraction in [0, 1], got {lag_tolerance!r}")
        self.every, n = self._intervals(epochs, steps, every)
        self.model = unwrap_model(model)
        self.example_inputs = example_inputs
        self.update = update
        self.threshold, self.min_channels, self.scope = float(threshold), min_channels, scope
        self.max_step_removal, self.lag_tolerance = float(max_step_removal), float(lag_tolerance)
        # The decoupled update spreads an interval's push over its optimiser steps, which must be
        # known (every=, or counted during an interval with the optimiser bound) before a focus.
        min_warmup = 0 if update == "loss" or self.every is not None else (1 if optimizer is not None else 2)
        self.latency_table = None
        if latency:
            self.latency_table, _ = latency_table_for(self.model, example_inputs, latency_table,
                                                      round_to=self.round_to, min_channels=min_channels,
                                                      residual_streams=self.residual_streams)
            if latency_kind == "max_latency":  # the schedule works in fractions of the unpruned latency
                self.target = min(1.0, self.target / self.latency_table.full)
        self.schedule = BudgetSchedule.make(self.target, n, budget_at=budget_at, warmup=warmup, settle=settle,
                                            max_step_removal=max_step_removal, min_warmup=min_warmup)
        self.controller = StrengthController(self.schedule, max_strength=(
            MAX_STRENGTH[update] if max_strength is None else max_strength))
        # The planner's own message for a budget min_channels makes unreachable, before training.
        if latency:
            self._plan_latency(self.model, self.target * self.latency_table.full)
        else:
            pruning.plan(self.model, scope=scope, min_channels=min_channels, example_inputs=example_inputs,
                         round_to=self.round_to, residual_streams=self.residual_streams, se_ratio=self.se_ratio,
                         **{f"target_{self.cost}": self.target})
        start = START_STRENGTH[update] if strength is None else strength
        self.regularizer = RecedingRegularizer(self.model, start, shift, fused=False, normalize="layer")
        logit = self.regularizer.layers[0].weight
        self._zero = torch.zeros((), dtype=logit.dtype, device=logit.device)
        self._counts: dict = {}
        self.original = self._count(self.model)
        self.original_flops = self._count(self.model, "flops")
        self.steps_done = 0
        self.history: list[PruneStep] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._hook = None
        self._interval_steps: int | None = self.every
        self._opt_steps = 0  # optimiser steps in the current interval (counted once bound)
        self._count_from: int | None = None  # the first interval whose optimiser steps were all counted
        self._penalty_calls = 0
        # The SE inner widths are cut once, at the first step; until then every plan counts that cut.
        self._se_pending = self.se_ratio > 0
        self._remember_shapes()
        self._focused = self._focus_next(0)
        if optimizer is not None:
            self._bind(optimizer, self.steps_done + 1)

    # -- set-up and checks --------------------------------------------------------------------

    @staticmethod
    def _intervals(epochs, steps, every) -> tuple[int | None, int]:
        if (epochs is None) == (steps is None):
            raise ValueError("give the schedule's length as epochs= (step() once per epoch) or as steps= with every= "
                             "(step() every `every` optimiser steps)")
        if epochs is not None:
            if every is not None:
                raise ValueError("every= goes with steps=, not with epochs= (step() is then called once per epoch)")
            if not is_int(epochs) or epochs < 2:
                raise ValueError(f"epochs must be an int >= 2 (one to reach the budget, one at it), got {epochs!r}")
            return None, epochs
        for name, value in (("steps", steps), ("every", every)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 with steps=, got {value!r}")
        if steps // every < 2:
            raise ValueError(f"steps // every must be >= 2 pruner steps, got {steps} // {every}")
        return every, steps // every

    def _remember_shapes(self) -> None:
        self._shapes = _shapes(self.model)
        self._widths = tuple(m.num_features for m in self.regularizer.layers)

    def _count(self, model: nn.Module, cost: str | None = None) -> int:
        """FLOPs or parameters (the budget's by default) of ``model``, cached per shape (a trace each otherwise)."""
        cost = cost or self.cost
        key = (cost, id(model), _shapes(model))
        if key not in self._counts:
            if cost == "latency":
                groups = pruning.find_channel_groups(model, self.example_inputs,
                                                     residual_streams=self.residual_streams)
                self._counts[key] = self.latency_table.predict({g.name: g.channels for g in groups})
            else:
                self._counts[key] = (pruning.count_flops(model, self.example_inputs) if cost == "flops"
                                     else pruning.count_params(model))
        return self._counts[key]

    def bind(self, optimizer: torch.optim.Optimizer) -> "BudgetPruner":
        """Bind the optimiser that trains the model before the first :meth:`step` (as the
        constructor's ``optimizer=`` does): its steps are counted from now on, so the decoupled
        update knows an interval's length one interval earlier. Returns ``self``."""
        self._bind(optimizer, self.steps_done + 1)
        return self

    def _bind(self, optimizer, count_from: int) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self.optimizer is not None:
            if optimizer is not self.optimizer:
                raise ValueError("this is not the optimizer the pruner was bound to: pass the same optimizer to every "
                                 "step() (build a new BudgetPruner for a new optimiser)")
            return
        own = {id(p) for p in self.model.parameters()}
        foreign = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        if foreign:
            raise ValueError(f"this optimizer was built for another model: it holds a parameter of shape {foreign[0]} "
                             f"that is not one of the {type(self.model).__name__}'s the pruner narrows; pass the "
                             "optimiser that trains this model")
        logits = {id(m.weight) for m in self.regularizer.layers}
        if self.update == "loss" and not logits & {id(p) for g in optimizer.param_groups for p in g["params"]}:
            raise ValueError("update='loss' needs the BatchNorm logits in the optimizer (they recede through it)")
        if self.update == "loss" and not isinstance(optimizer, torch.optim.SGD):
            warnings.warn(f"update='loss' under {type(optimizer).__name__}: an adaptive optimiser moves a logit by "
                          "about its learning rate whatever the penalty's scale, so the strength cannot control receding; "
                          "use update='decoupled' (the default)", RecedingLagWarning, stacklevel=3)
        self.optimizer = optimizer
        # A weak reference: a pruner that is gone (e.g. replaced by a new one) stops pushing.
        me = weakref.ref(self)

        def hook(opt, args, kwargs):
            pruner = me()
            if pruner is not None:
                pruner._after_optimizer_step()

        self._hook = optimizer.register_step_post_hook(hook)
        self._opt_steps = 0
        self._count_from = count_from

    def _check_step(self, optimizer, scheduler, scaler) -> None:
        if optimizer is None and self.optimizer is None:
            raise TypeError("step() needs the optimizer that trains the model (its state is sliced with the channels): "
                            "pruner.step(optimizer)")
        if self.steps_done >= self.schedule.steps:
            raise RuntimeError(f"the schedule has {self.schedule.steps} steps and all have run: build the pruner with "
                               "the epochs (or steps) you train for")
        if _shapes(self.model) != self._shapes:
            self._changed_behind()
        i = self.steps_done + 1
        self._bind(optimizer if optimizer is not None else self.optimizer, i + 1)
        if scheduler is not None and getattr(scheduler, "optimizer", self.optimizer) is not self.optimizer:
            raise ValueError("the scheduler drives another optimizer than the one given: pass the scheduler "
                             "built on it")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        counted = self._count_from is not None and self._count_from <= i
        if counted and self._opt_steps == 0:
            raise RuntimeError("no optimiser step since the last pruner.step(): call step() after training each "
                               "epoch (or every `every` optimiser steps)")
        if counted and self.every is not None and self._opt_steps != self.every:
            raise RuntimeError(f"pruner.step() came after {self._opt_steps} optimiser steps; it was built for one "
                               f"every {self.every} (every=)")
        if self.update == "decoupled" and self.schedule.focused(i) and self._interval_steps is None and not counted:
            raise RuntimeError("update='decoupled' spreads each interval's push over its optimiser steps, counted with "
                               "the optimizer bound for a whole interval: pass the optimizer to the constructor or to "
                               "the first step()")
        if self.update == "loss" and self._focused and self._penalty_calls == 0:
            raise RuntimeError("update='loss' needs loss = task_loss + pruner.penalty() at every step: penalty() was "
                               "not called since the last pruner.step()")

    @staticmethod
    def _changed_behind():
        raise RuntimeError("the model's parameters changed shape outside the pruner (pruned or rebuilt by other "
                           "code); narrow it only through pruner.step(), or build a new BudgetPruner")

    def _check_widths(self) -> None:
        """Cheap per-step check (the bound layers' widths) that nobody else narrowed the model."""
        if any(m.num_features != n for m, n in zip(self.regularizer.layers, self._widths)):
            self._changed_behind()

    # -- the training loop's calls ------------------------------------------------------------

    def penalty(self) -> Tensor:
        """The term to add to the loss: ``strength * focused receding penalty`` (see
        :class:`rnip_ext.RecedingRegularizer`) with ``update="loss"``; a zero with
        ``update="decoupled"``, where the focused logits move after each optimiser step instead
        (the call stays in the loop, so switching ``update`` changes nothing else)."""
        self._penalty_calls += 1
        self._check_widths()
        if self.update == "decoupled":
            return self._zero
        return self.regularizer()

    def __call__(self) -> Tensor:
        """:meth:`penalty`: the pruner follows the regulariser protocol
        (:class:`rnip_ext.regularizers.Regularizer`), so a trainer adds it to the loss."""
        return self.penalty()

    def after_step(self) -> None:
        """Nothing: the decoupled update runs in the bound optimiser's step hook."""

    def rebind(self, model: nn.Module) -> "BudgetPruner":
        """Re-read the bound layers (after a checkpoint narrowed ``model``, the pruner's own)."""
        if unwrap_model(model) is not self.model:
            raise ValueError("the BudgetPruner narrows the model it was built for, not another one")
        self.regularizer.rebind(self.model)
        return self

    @torch.no_grad()
    def _after_optimizer_step(self) -> None:
        self._opt_steps += 1
        if self.update != "decoupled" or not self._focused:
            return
        self._check_widths()
        reg = self.regularizer
        per_step = reg.strength / (self._interval_steps or max(self._opt_steps, 1))
        logits = [m.weight for m in reg.layers]
        with torch.enable_grad():
            grads = torch.autograd.grad(reg.penalty(), logits, allow_unused=True)
        for w, g in zip(logits, grads):
            if g is not None:
                w.sub_(per_step * g)

    def step(self, optimizer: torch.optim.Optimizer | None = None, *, scheduler=None, scaler=None,
             ema=None) -> PruneStep:
        """After an interval: adapt the strength, remove receded channels, cut to the schedule,
        focus on what goes next. ``optimizer`` (required once) has its state sliced in place;
        ``scheduler`` and ``scaler`` are checked, nothing else is needed for them; ``ema`` (a
        module or a list: ``AveragedModel``, timm ``ModelEmaV3``, a copy) is narrowed with the
        model. Returns the :class:`PruneStep` (also in :attr:`history`)."""
        self._check_step(optimizer, scheduler, scaler)
        emas = [] if ema is None else [_ema_module(e) for e in (ema if isinstance(ema, (list, tuple)) else [ema])]
        for e in emas:
            if _shapes(e) != self._shapes:
                raise ValueError("an EMA copy does not match the model: pass every EMA copy to every pruner.step() "
                                 "(build it from the model before the first step)")
        i = self.steps_done + 1
        if self.every is None and self._count_from is not None and self._count_from <= i:
            self._interval_steps = self._opt_steps  # epochs: S as counted in the interval that just ended
        model, reg = self.model, self.regularizer
        strength = reg.strength
        se_removed = self._cut_se(emas) if self._se_pending else 0
        current = self._count(model)
        receded = self._receded_plan(model)
        active = (self._plan_cost(receded) if receded is not None else current) / self.original
        if self._focused:  # the interval that just ended pushed some channels
            reg.strength = self.controller.update(i, min(active, 1.0), reg.strength)
        removed = forced = 0
        if receded is not None:
            floor = (1.0 - self.max_step_removal) * current
            if self._plan_cost(receded) < floor:  # more receded than one step may take: the lowest first
                receded = self._plan_to(floor / self.original, "global")
            removed += self._apply(receded, emas)
        cut = self.schedule.cut_at(i)
        if cut is not None:
            p = self._plan_to(cut, self.scope)
            if p is not None:
                before = self._count(model)
                share = 1.0 - self._plan_cost(p) / before
                if share > self.lag_tolerance:
                    self._warn_lag(i, cut, active, share, strength)
                forced = self._apply(p, emas)
                removed += forced
        changed = removed > 0 or se_removed > 0
        if changed:
            reg.rebind(model)
        self.steps_done = i
        focused = self._focused = self._focus_next(i)
        self._remember_shapes()
        self._opt_steps, self._penalty_calls = 0, 0
        self._check_ranks_agree()
        flops = self._count(model, "flops")
        record = PruneStep(i, self.schedule.steps, self.cost, self._count(model) / self.original, active,
                           self.schedule.target_at(i), strength, reg.strength, removed, forced, focused, changed,
                           flops, flops / self.original_flops, pruning.count_params(model),
                           {n: m.num_features for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d)},
                           se_removed)
        self.history.append(record)
        return record

    # -- planning -------------------------------------------------------------------------------

    def _plan_cost(self, p) -> float:
        if self.cost == "latency":  # a plan_from_keep plan (receded channels) has no latency of its own
            return p.latency[1] if p.latency else self.latency_table.predict(
                {g.name: len(k) for g in p.groups for k in [p.group_keep[g.name]]})
        return (p.flops if self.cost == "flops" else p.params)[1]

    def _plan_latency(self, model: nn.Module, seconds: float):
        from .pruning.latency_plan import plan_to_latency

        return plan_to_latency(model, example_inputs=self.example_inputs, max_latency=seconds,
                               latency_table=self.latency_table, round_to=self.round_to,
                               min_channels=self.min_channels, refine=0, residual_streams=self.residual_streams,
                               rule=self.latency_rule)

    def _receded_plan(self, model: nn.Module):
        """The plan removing every channel below ``threshold`` (:func:`rnip_ext.pruning.plan_receded`),
        or ``None`` when none has receded."""
        return pruning.plan_receded(model, example_inputs=self.example_inputs, threshold=self.threshold,
                                    min_channels=self.min_channels, round_to=self.round_to,
                                    residual_streams=self.residual_streams)

    def _plan_to(self, fraction: float, scope: str):
        """The planner's plan bringing the model to ``fraction`` of the original cost, or ``None``
        when it already meets it (the fraction of the *current* cost, rounded down by ulps so
        that ``after <= fraction * original`` holds in floating point)."""
        current = self._count(self.model)
        budget = fraction * self.original
        if self.cost == "latency":
            return None if current <= budget else self._plan_latency(self.model, budget)
        relative = budget / current
        while relative * current > budget:
            relative = math.nextafter(relative, 0.0)
        if relative >= 1.0 or math.isclose(relative, 1.0):
            return None
        return pruning.plan(self.model, scope=scope, min_channels=self.min_channels, round_to=self.round_to,
                            example_inputs=self.example_inputs, residual_streams=self.residual_streams,
                            se_ratio=self.se_ratio if self._se_pending else 0.0,
                            **{f"target_{self.cost}": relative})

    def _cut_se(self, emas) -> int:
        """Narrow every SE block to its final inner width (``se_ratio`` of the original width
        removed: the blocks are still at it, nothing else narrows them) once; the number of
        inner channels removed."""
        self._se_pending = False
        p = pruning.plan(self.model, 0.0, min_channels=self.min_channels, round_to=self.round_to,
                         example_inputs=self.example_inputs, residual_streams=self.residual_streams,
                         se_ratio=self.se_ratio)
        self._apply(p, emas)
        return sum(b.channels - len(p.se_keep[b.name]) for b in p.se_blocks if b.name in p.se_keep)

    def _apply(self, p, emas) -> int:
        """Narrow the model (and ``emas``) by ``p``; the BatchNorm channels it removes."""
        n = sum(g.channels - len(p.group_keep[g.name]) for g in p.groups)
        if n == 0 and not p.se_keep:
            return 0
        for e in emas:  # first: apply checks the plan against the (still unpruned) shapes
            pruning.apply(e, p, inplace=True)
        pruning.apply(self.model, p, optimizer=self.optimizer, inplace=True)  # leaves no stale grad accumulators
        return n

    def _focus_next(self, i: int) -> int:
        """Focus the penalty on the channels the planner would remove to meet the curve after
        the next interval (nothing during the warm-up or once the budget is met)."""
        masks = {n: torch.zeros(m.num_features, dtype=torch.bool)
                 for n, m in zip(self.regularizer.names, self.regularizer.layers)}
        if self.schedule.focused(i):
            p = self._plan_to(self.schedule.target_at(i + 1), self.scope)
            if p is not None:
                for name, kept in p.keep.items():
                    if name in masks:
                        masks[name][:] = True
                        masks[name][kept] = False
        self.regularizer.focus(masks)
        return int(sum(int(m.sum()) for m in masks.values()))

    def _warn_lag(self, i: int, cut: float, active: float, share: float, strength: float) -> None:
        cause = []
        if strength >= self.controller.max_strength:
            cause.append(f"the strength is at its cap ({self.controller.max_strength:g}): raise max_strength")
        if self.update == "loss" and self.optimizer is not None and not isinstance(self.optimizer, torch.optim.SGD):
            cause.append(f"update='loss' cannot speed receding under {type(self.optimizer).__name__}: use "
                         "update='decoupled'")
        cause.append("give receding more steps (more epochs, a later budget_at) or aim at a larger budget")
        warnings.warn(
            f"BudgetPruner step {i}/{self.schedule.steps}: the schedule cuts to {cut:.1%} "
            f"of the {self.cost} but {active:.1%} are still active (importance >= {self.threshold:g}); this cut "
            f"removes {share:.1%} of the network's {self.cost} in channels that still carry signal. To fix: "
            + "; ".join(cause), RecedingLagWarning, stacklevel=3)

    def _check_ranks_agree(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from .distributed import check_same

            device = next(self.model.parameters()).device
            check_same(pruning.architecture_json(self.model), device, "the model's architecture after pruner.step()")

    # -- queries and checkpoints ----------------------------------------------------------------

    @property
    def within_budget(self) -> bool:
        """Whether the model meets the budget now."""
        return self._count(self.model) <= self.target * self.original

    @property
    def done(self) -> bool:
        """Whether the schedule has reached the budget (its last cut is behind it)."""
        return self.steps_done >= self.schedule.done

    def state_dict(self) -> dict:
        """Plain values (``torch.load(weights_only=True)``): settings, progress, strength and its
        history, the focus, the optimiser steps per interval and the model's architecture."""
        reg = self.regularizer.state_dict()
        return {"format": FORMAT, "settings": self._settings(), "steps_done": self.steps_done,
                "original": self.original, "original_flops": self.original_flops,
                "interval_steps": self._interval_steps, "regularizer": reg, "controller": self.controller.state_dict(),
                "history": [asdict(r) for r in self.history],
                "architecture": pruning.architecture_json(self.model)}

    def _settings(self) -> dict:
        s = self.schedule
        return {"cost": self.cost, "target": self.target, "steps": s.steps, "every": self.every, "warmup": s.warmup,
                "by": s.by, "settle": s.settle, "update": self.update, "threshold": self.threshold,
                "min_channels": self.min_channels, "scope": self.scope, "round_to": self.round_to,
                "residual_streams": self.residual_streams, "se_ratio": self.se_ratio, "latency_rule": self.latency_rule}

    def load_state_dict(self, state: dict) -> None:
        """Continue where :meth:`state_dict` was taken: narrows the model (a fresh, unpruned
        instance of the same network, or one already at that architecture) in place to the
        saved architecture, so load the model's and the optimiser's state after this."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a BudgetPruner state (format {FORMAT!r}); was it written by an older rnip_ext?")
        # A state from before se_ratio / latency_rule: the SE blocks stayed whole, latency cuts were the knapsack's.
        saved = {"se_ratio": 0.0, "latency_rule": "knapsack", **state["settings"]}
        differ = [k for k, v in saved.items() if self._settings().get(k) != v]
        if differ:
            raise ValueError("this state comes from a BudgetPruner with other settings ("
                             + ", ".join(f"{k}: {saved[k]!r} vs {self._settings()[k]!r}" for k in differ)
                             + "): build the pruner as the run that saved it did")
        if state["original"] != self.original:
            raise ValueError(f"the state's network had {state['original']} {self.cost} before pruning, this model has "
                             f"{self.original}: load it onto a fresh instance of the same network")
        narrow_to(self.model, state["architecture"], self.optimizer)
        self.steps_done = int(state["steps_done"])
        self._se_pending = self.se_ratio > 0 and self.steps_done == 0  # the first step cut them (narrow_to redid it)
        self._interval_steps = state["interval_steps"]
        self.controller.load_state_dict(state["controller"])
        self.history = [PruneStep(**r) for r in state["history"]]
        self.regularizer.rebind(self.model)
        self.regularizer.load_state_dict(state["regularizer"])
        self._focused = int(sum(int(m.sum()) for m in (self.regularizer.focused or {}).values()))
        self._remember_shapes()
        self._opt_steps, self._penalty_calls = 0, 0
        self._count_from = self.steps_done + 1 if self.optimizer is not None else None

    def __repr__(self) -> str:
        s = self.schedule
        return (f"{type(self).__name__}(target_{self.cost}={self.target:g}, steps={s.steps}, warmup={s.warmup}, "
                f"by={s.by}, settle={s.settle}, update={self.update!r}, scope={self.scope!r}, "
                + (f"se_ratio={self.se_ratio:g}, " if self.se_ratio else "") + f"steps_done={self.steps_done})")


# -- narrowing a fresh model to a recorded architecture, keeping its parameter objects -----------

_SYNC = {"SyncBoundedBatchNorm2d": "BoundedBatchNorm2d", "SyncBatchNorm": "BatchNorm2d"}


def _layer_shapes(m: nn.Module, spec: dict) -> dict[str, tuple]:
    if isinstance(m, nn.Conv2d):
        return {"weight": (spec["out"], spec["in"] // spec["groups"], *m.kernel_size), "bias": (spec["out"],)}
    if isinstance(m, nn.Linear):
        return {"weight": (spec["out"], spec["in"]), "bias": (spec["out"],)}
    return {k: (spec["features"],) for k in ("weight", "bias", "running_mean", "running_var")}


@torch.no_grad()
def narrow_to(model: nn.Module, architecture: str | dict, optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Narrow ``model`` in place to ``architecture`` (:func:`rnip_ext.pruning.architecture_json`
    of a network pruned from the same one), keeping every module and parameter object (new,
    uninitialised data: load the state afterwards), so an optimiser built on ``model`` stays
    bound (``optimizer``: its state for resized parameters is dropped, a bias the architecture
    has and ``model`` lacks joins its weight's group). Returns whether anything changed.
    ``ValueError`` when ``model`` cannot have been narrowed to it (another network, a wider layer)."""
    arch = json.loads(architecture) if isinstance(architecture, str) else architecture
    if not isinstance(arch, dict) or not isinstance(arch.get("modules"), dict):
        raise ValueError("not an architecture recorded by rnip_ext.pruning.architecture_json")
    current = json.loads(pruning.architecture_json(model))["modules"]
    stored = arch["modules"]
    if current == stored:
        return False
    if set(current) != set(stored):
        missing = sorted(set(current) ^ set(stored))[:3]
        raise ValueError(f"the recorded architecture is not this network's (layers differ: {', '.join(missing)})")
    modules = dict(model.named_modules())
    for name, spec in stored.items():
        have = current[name]
        same_type = _SYNC.get(have["type"], have["type"]) == _SYNC.get(spec["type"], spec["type"])
        wider = any(spec.get(k, 0) > have.get(k, 0) for k in ("in", "out", "features"))
        if not same_type or wider or (have.get("bias") and not spec.get("bias")):
            raise ValueError(f"the recorded layer '{name}' ({spec}) cannot come from this network's ({have}) by pruning")
    for name, spec in stored.items():
        if spec == current[name]:
            continue
        m = modules[name]
        shapes = _layer_shapes(m, spec)
        for attr, shape in shapes.items():
            t = getattr(m, attr, None)
            if t is None:
                if attr == "bias" and spec.get("bias"):
                    ref = m.weight
                    m.bias = nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device),
                                          requires_grad=ref.requires_grad)
                    if optimizer is not None:
                        for group in optimizer.param_groups:
                            if any(p is ref for p in group["params"]):
                                group["params"].append(m.bias)
                                break
                continue
            if isinstance(t, nn.Parameter):
                replace_data(t, torch.empty(shape, dtype=t.dtype, device=t.device))
                if optimizer is not None:
                    optimizer.state.pop(t, None)
            else:
                m._buffers[attr] = torch.empty(shape, dtype=t.dtype, device=t.device)
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = spec["in"], spec["out"], spec["groups"]
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = spec["in"], spec["out"]
        else:
            m.num_features = spec["features"]
    return True
