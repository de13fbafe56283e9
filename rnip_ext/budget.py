"""Training to a FLOPs budget in one run: receded channels leave between epochs, no fine-tuning phase.

    best = rnip_ext.budget.train_to_budget(model, splits, "runs/b5", target_flops=0.05, epochs=30,
                                           example_inputs=torch.zeros(1, 1, 16, 16))
    small = best["model"]                      # the final, narrowed network (<= 5% of the MACs)

The pieces: :class:`rnip_ext.RecedingRegularizer` with ``cost="flops"`` (each channel's term
weighted by the MACs it carries), :class:`rnip_ext.pruning.BudgetController` (adapts the strength
once per epoch so the active FLOPs follow a linear schedule to the target),
:class:`rnip_ext.pruning.RecedingSchedule` (removes channels whose importance fell below the
threshold, and cuts to the budget exactly by the planner's global ranking), all driven from
:func:`rnip_ext.training.fit`'s ``on_epoch_end`` by :class:`BudgetPruning`.
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from .nn import BoundedBatchNorm2d
from .pruning.controller import BudgetController, ControllerRecord, active_flops
from .pruning.flops import count_flops, count_params
from .pruning.schedule import RecedingSchedule

__all__ = ["BudgetPruning", "check_budget", "train_to_budget"]


def check_budget(model: nn.Module, target_flops: float, example_inputs, *, threshold: float = 0.01,
                 min_channels: int = 3) -> None:
    """``ValueError`` naming the problem for a target outside (0, 1], a threshold outside (0, 1),
    or a budget that ``min_channels`` makes unreachable for ``model`` (the budget planner's
    message, naming the smallest reachable fraction). Nothing is changed."""
    from .pruning.plan import plan

    RecedingSchedule(example_inputs, threshold, min_channels)  # threshold, min_channels
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not (
        0.0 < target_flops <= 1.0
    ):
        raise ValueError(f"target_flops must be a fraction in (0, 1], got {target_flops!r}")
    plan(model, target_flops=float(target_flops), min_channels=min_channels, example_inputs=example_inputs)


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
    4. from epoch ``by_epoch`` on, :meth:`RecedingSchedule.enforce_budget` cuts to the budget
       exactly (the lowest-ranked remaining channels by the global ranking; a no-op once met),
       so the last ``epochs - by_epoch`` epochs train the network at its final size.

    Decisions: the budget is reached at half the epochs by default (``budget_at=0.5``), when
    the paper's learning-rate schedule first divides the lr by 10, leaving half the run to
    recover at the final width (there is no separate fine-tuning phase). The controller keeps
    its defaults (at most x1.5 per epoch up, x0.25 down, braked by x0.5 when more than 10% of
    the FLOPs receded in one epoch). Each epoch's metrics row gets ``params``, ``flops``,
    ``flops_fraction`` (of the original), ``channels`` (``{BatchNorm name: width}``),
    ``strength`` (used in the epoch), ``next_strength``, ``active_flops_fraction``,
    ``flops_schedule`` (the controller's target after the epoch) and ``removed`` (channels
    removed after the epoch). :meth:`state_dict`/:meth:`load_state_dict` carry the original
    FLOPs and the controller's history across a resume (:func:`fit` stores them in
    ``last.pt``). :attr:`model` is the latest model the callback left.
    """

    def __init__(self, example_inputs, target_flops: float, epochs: int, *, prune_every: int = 1,
                 threshold: float = 0.01, min_channels: int = 3, budget_at: float = 0.5,
                 controller: BudgetController | None = None) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
            raise ValueError(f"epochs must be an int >= 2 (the budget is enforced after an epoch and at least one "
                             f"epoch trains the network at its budget), got {epochs!r}")
        if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
            raise ValueError(f"prune_every must be an int >= 1, got {prune_every!r}")
        if isinstance(budget_at, bool) or not isinstance(budget_at, (int, float)) or not 0.0 < budget_at <= 1.0:
            raise ValueError(f"budget_at must be a fraction of the epochs in (0, 1], got {budget_at!r}")
        self.schedule = RecedingSchedule(example_inputs, threshold, min_channels, every=prune_every,
                                         start=prune_every - 1)
        # At least one epoch trains at the budget, so best.pt (chosen among in-budget epochs) exists.
        self.by_epoch = max(1, min(epochs - 1, round(budget_at * epochs)))
        self.controller = controller if controller is not None else BudgetController(target_flops, self.by_epoch)
        self.target_flops = self.controller.target_flops
        self.example_inputs = example_inputs
        self.epochs = epochs
        self.model: nn.Module | None = None

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
        if state.epoch >= self.by_epoch:
            step = self.schedule.enforce_budget(epoch, model, self.target_flops, state.optimizer)
            model, removed = step.model, removed + step.n_removed
        state.model = model
        self.model = model
        flops = count_flops(model, self.example_inputs)
        state.metrics.update(
            params=count_params(model), flops=flops, flops_fraction=flops / original,
            channels={n: m.num_features for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d)},
            strength=used, next_strength=float(reg.strength) if reg is not None else None,
            active_flops_fraction=active, flops_schedule=self.controller.target_at(state.epoch), removed=removed,
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
                    strength: float = 1e-3, shift: float = 3.0, prune_every: int = 1, threshold: float = 0.01,
                    min_channels: int = 3, budget_at: float = 0.5, resume_from: dict | None = None,
                    normalize: str | None = "layer", **fit_kwargs) -> dict:
    """Train ``model`` to ``target_flops`` of its MACs in one :func:`rnip_ext.training.fit` run.

    The regulariser is ``RecedingRegularizer(model, strength, shift, cost="flops",
    example_inputs=example_inputs, normalize=normalize)`` (``strength`` is where the controller starts); the callback
    is :class:`BudgetPruning` (see it for the schedule and the metrics); ``best.pt`` is the
    best-validation epoch among those whose network meets the budget. Bad input
    (:func:`check_budget`) raises ``ValueError`` before anything is written. ``fit_kwargs`` go
    to :func:`fit` (``lr``, ``batch_size``, ``seed``, ``amp``, ``compile``, ``dist_ctx``, ...).

    Returns :func:`fit`'s ``{"val_accuracy", "epoch", "test_accuracy"}`` plus ``"model"`` (the
    final narrowed network), ``"flops"``, ``"params"``, ``"flops_fraction"`` and
    ``"original_flops"``.
    """
    from .regularizers import RecedingRegularizer
    from .training import fit

    check_budget(model, target_flops, example_inputs, threshold=threshold, min_channels=min_channels)
    reg = RecedingRegularizer(model, strength, shift, cost="flops", example_inputs=example_inputs,
                              normalize=normalize)
    callback = BudgetPruning(example_inputs, target_flops, epochs, prune_every=prune_every, threshold=threshold,
                             min_channels=min_channels, budget_at=budget_at)
    if resume_from is None:
        callback.schedule.original_flops = count_flops(model, example_inputs)
    best = fit(model, splits, out, epochs=epochs, regularizer=reg, resume_from=resume_from, on_epoch_end=callback,
               selectable=callback.within_budget, **fit_kwargs)
    final = callback.model if callback.model is not None else model
    flops = count_flops(final, example_inputs)
    return dict(best, model=final, flops=flops, params=count_params(final),
                flops_fraction=flops / callback.original_flops, original_flops=callback.original_flops)

