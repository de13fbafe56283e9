"""What the project's trainer does besides training, each a callback of :class:`rnip_ext.training.Trainer`.

    callbacks = run_callbacks("runs/a", splits, budget=pruner)   # the CLI's run directory
    # = [Evaluate(splits.val, splits.test), BestModel("runs/a", selectable=...), BudgetPruning(pruner),
    #    MetricsLog("runs/a"), Checkpoint("runs/a")]

Per epoch, in list order, each callback's ``on_epoch_end(trainer, metrics)`` may read the
trainer's state, add keys to the epoch's ``metrics`` row and narrow the model in place (the
trainer then rebuilds its wrappers). ``state_dict()``/``load_state_dict()`` travel in the
trainer's checkpoint under ``state_key``. A run directory's files are written on rank 0 only,
atomically, and a fresh run never replaces another's (:mod:`rnip_ext.rundir`).
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["BestModel", "BudgetPruning", "Callback", "Checkpoint", "Evaluate", "MetricsLog", "run_callbacks"]


class Callback:
    """A hook into the trainer; override what you need. ``state_key`` names its state in checkpoints."""

    @property
    def state_key(self) -> str:
        return type(self).__name__

    def on_fit_start(self, trainer) -> None:
        """Before the first epoch (and before a resumed run's states are loaded)."""

    def on_train_batch_end(self, trainer, step: int) -> None:
        """After each optimiser step (``step`` counts from 1 in the epoch)."""

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        """After each epoch (``trainer.epoch`` finished), with the epoch's ``metrics`` row."""

    def on_fit_end(self, trainer) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (on resume)."""


class _RunFile(Callback):
    """A callback owning one file of a run directory: recorded in the manifest before it is
    written, and never over another run's file."""

    name = ""

    def __init__(self, out) -> None:
        self.out = os.fspath(out)
        self.path = os.path.join(self.out, self.name)

    def on_fit_start(self, trainer) -> None:
        from .rundir import OutputDirError, record

        if not trainer.is_main:
            return
        # Any run file there (not only this one): the first such callback refuses before any writes.
        existing = [f for f in ("metrics.jsonl", "best.pt", "last.pt") if os.path.exists(os.path.join(self.out, f))]
        if not trainer.resuming and existing:
            raise OutputDirError(f"{self.out} already holds {', '.join(existing)}: pass resume_from="
                                 "load_checkpoint(<out>/last.pt) to continue that run, or use another directory")
        os.makedirs(self.out, exist_ok=True)
        record(self.out, self.name)


class Evaluate(Callback):
    """Top-1 accuracy on ``val`` (and ``test``) after each epoch, on rank 0: ``val_accuracy``, ``test_accuracy``."""

    def __init__(self, val, test=None, batch_size: int = 256, num_workers: int = 0) -> None:
        self.val, self.test, self.batch_size, self.num_workers = val, test, batch_size, num_workers

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        from .training import evaluate

        if not trainer.is_main:
            return
        kw = dict(batch_size=self.batch_size, amp=trainer.amp, channels_last=trainer.channels_last,
                  num_workers=self.num_workers)
        metrics["val_accuracy"] = evaluate(trainer.eval_model, self.val, **kw)
        metrics["test_accuracy"] = evaluate(trainer.eval_model, self.test, **kw) if self.test is not None else None


class BestModel(_RunFile):
    """Model selection on validation accuracy: ``best.pt`` (``{"model", "architecture", "epoch"}``)
    when an epoch beats the best so far; with ``selectable`` (a callable taking the model) only
    epochs it accepts compete (e.g. those within a budget). Needs :class:`Evaluate` before it."""

    name = "best.pt"

    def __init__(self, out, selectable=None) -> None:
        super().__init__(out)
        self.selectable = selectable
        self.best = {"val_accuracy": None, "epoch": None, "test_accuracy": None}

    @property
    def state_key(self) -> str:
        return "best"

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        from .pruning import architecture_json
        from .rundir import save_checkpoint

        if not trainer.is_main:
            return
        if "val_accuracy" not in metrics:
            raise ValueError("BestModel selects on val_accuracy: put an Evaluate callback before it")
        val = metrics["val_accuracy"]
        best = self.best["val_accuracy"]
        if (best is None or val > best) and (self.selectable is None or self.selectable(trainer.model)):
            self.best = {"val_accuracy": val, "epoch": trainer.epoch, "test_accuracy": metrics.get("test_accuracy")}
            save_checkpoint(self.path, {"model": trainer.model.state_dict(),
                                        "architecture": architecture_json(trainer.model), "epoch": trainer.epoch - 1})
        trainer.best = dict(self.best)

    def state_dict(self) -> dict:
        return dict(self.best)

    def load_state_dict(self, state: dict) -> None:
        self.best = {k: state.get(k) for k in ("val_accuracy", "epoch", "test_accuracy")}
        if self.best["val_accuracy"] is not None and self.best["val_accuracy"] < 0:  # older runs' "none yet"
            self.best = {"val_accuracy": None, "epoch": None, "test_accuracy": None}


class MetricsLog(_RunFile):
    """``metrics.jsonl``: one row per epoch (what the callbacks before it added, plus
    ``wall_seconds`` for the epoch and ``time``); a resumed run drops rows of later epochs
    (written before a crash), so every epoch appears once."""

    name = "metrics.jsonl"

    def __init__(self, out) -> None:
        super().__init__(out)
        self._first = True

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        from .rundir import append_jsonl

        metrics["wall_seconds"] = time.perf_counter() - trainer.epoch_start  # train, evaluate, callbacks
        metrics["time"] = time.time()
        if not trainer.is_main:
            return
        if self._first:
            _drop_rows_after(self.path, trainer.epoch - 1)
            self._first = False
        append_jsonl(self.path, metrics)


class Checkpoint(_RunFile):
    """``last.pt``: :meth:`Trainer.checkpoint <rnip_ext.training.Trainer.checkpoint>` after each
    epoch, written atomically; continue with ``fit(..., resume_from=load_checkpoint(path))``."""

    name = "last.pt"

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        from .rundir import save_checkpoint

        if not trainer.is_main:
            return
        save_checkpoint(self.path, trainer.checkpoint())
        trainer.saved = (self.path, trainer.epoch)


class BudgetPruning(Callback):
    """Drives a :class:`rnip_ext.BudgetPruner` from the trainer: ``pruner.step(optimizer,
    scheduler=, scaler=)`` after each epoch, its numbers (:meth:`PruneStep.metrics
    <rnip_ext.pruner.PruneStep.metrics>`) in the epoch's row. Pass the pruner as the trainer's
    ``regularizer`` too (required with ``update="loss"``; with the default ``"decoupled"`` it
    logs the penalty). The pruner is built for ``epochs=`` the trainer's epochs."""

    def __init__(self, pruner) -> None:
        from .pruner import BudgetPruner

        if not isinstance(pruner, BudgetPruner):
            raise TypeError(f"BudgetPruning drives a BudgetPruner, got {type(pruner).__name__}")
        self.pruner = pruner
        self._with_regularizer = False

    @property
    def state_key(self) -> str:
        return "budget"

    def on_fit_start(self, trainer) -> None:
        from .pruner import unwrap_model

        p = self.pruner
        if p.model is not unwrap_model(trainer.model):
            raise ValueError("the BudgetPruner was built for another model than the trainer's")
        if p.every is not None or p.schedule.steps != trainer.epochs:
            raise ValueError(f"the BudgetPruner's schedule has {p.schedule.steps} steps; the trainer runs "
                             f"{trainer.epochs} epochs: build it with epochs={trainer.epochs}")
        if trainer.regularizer is not p and (p.update == "loss" or trainer.regularizer is not None):
            raise ValueError("a budget run trains with the pruner's penalty: fit(..., regularizer=pruner) "
                             "(and no other regulariser)")
        self._with_regularizer = trainer.regularizer is p  # its state then travels as the regulariser's
        if p.optimizer is None:
            p.bind(trainer.optimizer)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        step = self.pruner.step(trainer.optimizer, scheduler=trainer.scheduler, scaler=trainer.scaler)
        metrics.update(step.metrics())

    def state_dict(self) -> dict:
        return {} if self._with_regularizer else self.pruner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.pruner.load_state_dict(state)


def run_callbacks(out, data=None, *, val=None, test=None, budget=None, num_workers: int = 0) -> list[Callback]:
    """The callbacks of a run directory ``out``: :class:`Evaluate` (``data.val``/``data.test`` of
    a :class:`~rnip_ext.data.DataSplits`, or ``val``/``test``; ``num_workers`` loader processes
    for datasets read from disk), :class:`BestModel` (only epochs
    within the budget compete when ``budget``, a :class:`~rnip_ext.BudgetPruner`, is given),
    :class:`BudgetPruning` (with ``budget``), :class:`MetricsLog` and :class:`Checkpoint`."""
    if data is not None:
        val, test = data.val, data.test
    if val is None:
        raise ValueError("run_callbacks needs validation data for model selection: data=DataSplits or val=")
    callbacks: list[Callback] = [Evaluate(val, test, num_workers=num_workers)]
    callbacks.append(BestModel(out, selectable=None if budget is None else (lambda model: budget.within_budget)))
    if budget is not None:
        callbacks.append(BudgetPruning(budget))
    callbacks += [MetricsLog(out), Checkpoint(out)]
    return callbacks


def _drop_rows_after(path: str, epoch: int) -> None:
    """Keep the metrics rows of epochs ``<= epoch`` (later ones died before their checkpoint)."""
    from .rundir import _atomic

    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                if line.strip() and json.loads(line)["epoch"] <= epoch:
                    rows.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(rows)

    _atomic(path, write)
