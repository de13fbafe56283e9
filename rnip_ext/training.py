"""The project's trainer: the paper's recipe, one loop, and callbacks for everything else.

    best = fit(model, splits, epochs=30, callbacks=run_callbacks("runs/a", splits))
    best = fit(model, my_loader, epochs=30, optimizer=opt, loss=criterion, callbacks=[...])

Recipe (Suteu & Guo), used when no optimiser is given: SGD with Nesterov momentum 0.9, lr 0.1
divided by 10 at 50% and 75% of the epochs, weight decay 1e-4 on convolutions and linear layers,
BatchNorm parameters with 10x the learning rate and no weight decay. :class:`Trainer` runs the
epochs; evaluation, metrics, checkpoints, model selection and budget pruning are callbacks
(:mod:`rnip_ext.callbacks`), so a new feature is a callback, not a parameter of the loop. Data:
an :class:`~rnip_ext.data.InMemoryDataset` (or :class:`~rnip_ext.data.DataSplits`), a
``DataLoader`` or a map-style/iterable ``Dataset`` (:mod:`rnip_ext.data.loading`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_int
from .callbacks import BestModel, BudgetPruning, Callback, Checkpoint, Evaluate, MetricsLog, run_callbacks
from .data import DataSplits
from .data.loading import eval_batches, train_batches
from .nn import BoundedBatchNorm2d
from .pruner import _forget_grad_accumulators, _shapes, narrow_to
from .regularizers import L1Regularizer, PolarizationRegularizer, RecedingRegularizer, Regularizer, param_groups

__all__ = [
    "METHODS",
    "DEFAULT_STRENGTH",
    "BestModel",
    "BudgetPruning",
    "Callback",
    "Checkpoint",
    "EpochStats",
    "Evaluate",
    "MetricsLog",
    "NonFiniteLossError",
    "Trainer",
    "bn_kind",
    "default_strength",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_regularizer",
    "make_scheduler",
    "run_callbacks",
    "train_epoch",
    "upgrade_checkpoint",
]

METHODS = ("rni", "l1", "polarization", "none")

# The paper's strengths (and shifts) per method and architecture family.
DEFAULT_STRENGTH = {
    ("rni", "vgg"): (1e-3, 3.0),
    ("rni", "resnet"): (1e-4, 0.0),
    ("l1", "vgg"): (1e-4, 0.0),
    ("l1", "resnet"): (1e-5, 0.0),
    ("polarization", "vgg"): (1e-4, 0.0),
    ("polarization", "resnet"): (1e-5, 0.0),
}


def bn_kind(method: str) -> str:
    """The receding regulariser needs bounded BatchNorms; the baselines train plain ones."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return "bounded" if method == "rni" else "plain"


def default_strength(method: str, arch: str) -> tuple[float, float]:
    """``(strength, shift)`` the paper used for ``method`` on ``arch`` (0 for ``none``)."""
    if method == "none":
        return 0.0, 0.0
    family = "resnet" if "resnet" in arch else "vgg"
    return DEFAULT_STRENGTH[(method, family)]


PENALTIES = {"layer": "layer", "paper": None}


def make_regularizer(model: nn.Module, method: str, strength: float, shift: float = 0.0, penalty: str = "layer"):
    """The regulariser of ``method`` for ``model`` (``None`` for ``none`` or zero strength).

    ``penalty`` (``rni`` only): ``"layer"`` for the layer-normalised receding penalty (the
    library's default, see :class:`RecedingRegularizer`), ``"paper"`` for the paper's formulation
    (``normalize=None``).
    """
    bn_kind(method)
    if penalty not in PENALTIES:
        raise ValueError(f"penalty must be one of {tuple(PENALTIES)}, got {penalty!r}")
    if method == "none" or strength == 0:
        return None
    if method == "rni":
        return RecedingRegularizer(model, strength, shift, normalize=PENALTIES[penalty])
    if method == "l1":
        return L1Regularizer(model, strength)
    return PolarizationRegularizer(model, strength)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-4, bn_lr_scale: float = 10.0):
    """SGD, Nesterov momentum 0.9, with the paper's groups: every BatchNorm (bounded or plain) gets
    ``bn_lr_scale * lr`` and no weight decay, so baselines train under the same recipe."""
    groups = param_groups(model, lr, weight_decay, bn_lr_scale,
                          bn_types=(BoundedBatchNorm2d, nn.modules.batchnorm._BatchNorm))
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def make_scheduler(optimizer, epochs: int):
    """lr / 10 at 50% and 75% of the epochs."""
    milestones = sorted({max(1, math.floor(epochs * 0.5)), max(1, math.floor(epochs * 0.75))})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


@dataclass
class EpochStats:
    """What one training epoch measured (``accuracy`` is ``nan`` when the targets are not class indices)."""

    loss: float
    accuracy: float
    penalty: float
    images_per_second: float


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class NonFiniteLossError(FloatingPointError):
    """The training loss (or penalty) became NaN or infinite: diverged, or non-finite input."""


def train_epoch(model: nn.Module, batches, optimizer, *, loss=None, regularizer=None, amp: str = "none",
                scaler=None, scheduler=None, channels_last: bool = False, progress: bool = False,
                description: str = "train", log_every: int = 50, total: int | None = None,
                on_step=None) -> EpochStats:
    """One pass over ``batches`` (``(inputs, targets)`` on the model's device) of ``loss(out, y) +
    regularizer()``; mean loss, accuracy, penalty and images/s.

    ``loss`` defaults to ``cross_entropy``. After each optimiser step: ``regularizer.after_step()``,
    ``scheduler.step()`` when given (a per-step scheduler), ``on_step(step)``. Loss, correct
    predictions and penalty are summed on the device and read back once at the end of the epoch,
    and every ``log_every`` steps while a progress bar is shown: no per-step host synchronisation.
    Raises :class:`NonFiniteLossError` at the first read-back that sees a NaN/inf loss or penalty
    (the optimiser has then already stepped on it; checkpoints are untouched).
    """
    from tqdm.auto import tqdm

    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    criterion = F.cross_entropy if loss is None else loss
    model.train()
    sums = None  # [loss * n, correct, penalty * n] on the device
    total_n, classify = 0, True
    start = time.perf_counter()
    bar = tqdm(batches, total=total, desc=description, leave=False, disable=not progress)

    def read_back() -> list[float]:
        loss_sum, correct, penalty_sum = sums.tolist() if sums is not None else (0.0, 0.0, 0.0)
        if not (math.isfinite(loss_sum) and math.isfinite(penalty_sum)):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_sum / max(total_n, 1):g}, penalty {penalty_sum / max(total_n, 1):g})")
        n = max(total_n, 1)
        return [loss_sum / n, correct / n if classify else float("nan"), penalty_sum / n]

    for step, (x, y) in enumerate(bar, 1):
        if sums is None:
            sums = torch.zeros(3, dtype=torch.float32 if x.device.type == "mps" else torch.float64, device=x.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(x.device, amp):
            out = model(x)
            task = criterion(out, y)
        penalty = regularizer() if regularizer is not None else None
        total_loss = task if penalty is None else task + penalty
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total_loss.backward()
            optimizer.step()
        if regularizer is not None:
            regularizer.after_step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        total_n += n
        classify = classify and out.dim() == 2 and not y.is_floating_point() and y.dim() == 1
        with torch.no_grad():
            sums[0] += task.detach().double() * n
            if classify:
                sums[1] += (out.argmax(1) == y).sum()
            if penalty is not None:
                sums[2] += penalty.detach().double() * n
        if on_step is not None:
            on_step(step)
        if progress and step % log_every == 0:
            loss_mean, acc, _ = read_back()
            bar.set_postfix(loss=f"{loss_mean:.3f}", acc=f"{acc:.3f}")
    loss_mean, acc, penalty_mean = read_back()
    elapsed = time.perf_counter() - start
    return EpochStats(loss_mean, acc, penalty_mean, total_n / max(elapsed, 1e-9))


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256, *, amp: str = "none", channels_last: bool = False,
             num_workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``data`` (an ``InMemoryDataset``, a ``DataLoader``
    or a ``Dataset`` of ``(input, class index)``)."""
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in eval_batches(data, batch_size, device, num_workers=num_workers):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            correct += (model(x).argmax(1) == y).sum()
        seen += y.shape[0]
    return correct.item() / max(seen, 1)


def _use_bars(progress) -> bool:
    if progress in ("bar", "lines"):
        return progress == "bar"
    return sys.stdout.isatty() and sys.stderr.isatty()


# The checkpoint format of Trainer.checkpoint() (last.pt); runs before it had no "format" key.
FORMAT = "rnip_ext.train/2"
# Settings of a run that fit reads from a run config dict (see rnip_ext.app.spec).
FIT_SETTINGS = ("lr", "batch_size", "weight_decay", "bn_lr_scale", "seed", "amp", "channels_last", "compile")


class Trainer:
    """The training loop: state callbacks read and may change, and :meth:`fit`.

    Attributes callbacks use: ``model`` (the plain module; a callback may narrow it in place),
    ``optimizer``, ``scheduler``, ``scaler``, ``regularizer``, ``epoch`` (epochs finished),
    ``epochs``, ``is_main`` (rank 0, or no torchrun: the process that evaluates and writes),
    ``dist_ctx``, ``device``, ``eval_model`` (the module to evaluate: compiled when asked),
    ``resuming`` (whether :meth:`fit` continues a checkpoint), ``best`` (what model selection
    chose), ``saved`` (``(path, epoch)`` of the last checkpoint written, for messages).
    See :func:`fit` for the arguments.
    """

    def __init__(self, model: nn.Module, data, *, epochs: int, optimizer: torch.optim.Optimizer | None = None,
                 scheduler=None, scheduler_step: str = "epoch", scaler=None, loss=None, regularizer=None, callbacks=(),
                 batch_size: int = 64, lr: float = 0.1, weight_decay: float = 1e-4, bn_lr_scale: float = 10.0,
                 seed: int = 0, amp: str = "none", channels_last: bool = False, compile: bool = False,
                 dist_ctx=None, num_workers: int = 0, progress: bool | str = True, description: str = "train",
                 log_every: int = 50) -> None:
        check_int("epochs", epochs, 1)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if scheduler is not None and optimizer is None:
            raise ValueError("a scheduler needs the optimizer it was built on: pass optimizer= too")
        if scheduler_step not in ("epoch", "step"):
            raise ValueError(f"scheduler_step must be 'epoch' or 'step', got {scheduler_step!r}")
        if amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise TypeError(f"{type(regularizer).__name__} is not a regulariser: it needs __call__, after_step, rebind, "
                            "state_dict and load_state_dict (rnip_ext.regularizers.Regularizer)")
        keys = [cb.state_key for cb in callbacks]
        if any(not isinstance(cb, Callback) for cb in callbacks) or len(set(keys)) != len(keys):
            raise TypeError("callbacks must be rnip_ext.callbacks.Callback instances with distinct state_key values")
        self.model, self.epochs, self.regularizer = model, epochs, regularizer
        self.device = next(model.parameters()).device
        if optimizer is None:
            optimizer = make_optimizer(model, lr, weight_decay, bn_lr_scale)
            scheduler = make_scheduler(optimizer, epochs)
        else:
            own = {id(p) for p in model.parameters()}
            if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
                raise ValueError("the optimizer holds parameters that are not the model's: build it on this model")
        self.optimizer, self.scheduler, self.scheduler_step = optimizer, scheduler, scheduler_step
        self.loss = loss
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler if scaler is not None else (torch.amp.GradScaler(self.device.type) if amp == "fp16" else None)
        self.amp, self.channels_last, self.compile = amp, channels_last, compile
        self.dist_ctx = dist_ctx
        self.is_main = dist_ctx is None or dist_ctx.is_main
        self.generator = torch.Generator().manual_seed(seed)
        self.train_data = data.train if isinstance(data, DataSplits) else data
        self.batches = train_batches(self.train_data, batch_size=batch_size, generator=self.generator,
                                     device=self.device, dist_ctx=dist_ctx, num_workers=num_workers, seed=seed)
        self.callbacks = list(callbacks)
        self.progress, self.description, self.log_every = progress, description, log_every
        self.epoch = 0
        self.resuming = False
        self.best: dict = {"val_accuracy": None, "epoch": None, "test_accuracy": None}
        self.saved: tuple[str, int] | None = None
        self._ddp = None
        self.eval_model = self.train_model = model

    # -- wrappers ----------------------------------------------------------------------------------

    def _wrap(self) -> None:
        """(Re)build the compiled runner and the DDP wrapper around the current model."""
        model = self.model
        self._ddp = None  # the old wrapper holds gradient buckets of the old shapes
        self.eval_model = torch.compile(model) if self.compile else model
        self.train_model = self.eval_model
        if self.dist_ctx is not None:
            from torch.nn.parallel import DistributedDataParallel

            d = self.device
            self._ddp = DistributedDataParallel(model, device_ids=[d.index] if d.type == "cuda" else None)
            self.train_model = torch.compile(self._ddp) if self.compile else self._ddp

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """Everything a resume needs, as plain tensors and containers (``weights_only=True``):
        model and its architecture, optimiser, scheduler, scaler, epoch (0-based), generator and
        torch RNG states, the regulariser's and every callback's ``state_dict()``."""
        from .pruning import architecture_json

        return {"format": FORMAT, "model": self.model.state_dict(), "architecture": architecture_json(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "epoch": self.epoch - 1,
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "regularizer": self.regularizer.state_dict() if self.regularizer is not None else None,
                "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks}}

    def _restore(self, payload: dict) -> None:
        payload = upgrade_checkpoint(payload)
        if payload.get("architecture"):
            # A run pruned while training: narrow the model in place (the optimiser stays bound).
            narrow_to(self.model, payload["architecture"], self.optimizer)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        self.epoch = int(payload["epoch"]) + 1
        if self.regularizer is not None:
            self.regularizer.rebind(self.model)
            if payload.get("regularizer") is not None:
                self.regularizer.load_state_dict(payload["regularizer"])
        for cb in self.callbacks:
            state = payload["callbacks"].get(cb.state_key)
            if state is not None:
                cb.load_state_dict(state)

    def saved_note(self) -> str:
        """Where the last good state is, for error messages."""
        if self.saved is None:
            return "nothing of this run was checkpointed"
        return f"{self.saved[0]} still holds epoch {self.saved[1]}, untouched"

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self, resume_from: dict | None = None) -> dict:
        """Train from epoch ``self.epoch`` (or after ``resume_from``'s, a :meth:`checkpoint`) to
        ``epochs``; returns ``best`` (model selection's choice, when a callback made one) with
        ``"epoch"`` and the last epoch's ``"metrics"``."""
        from tqdm.auto import tqdm

        from . import distributed as D

        self.resuming = resume_from is not None
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if resume_from is not None:
            self._restore(resume_from)
        self._wrap()
        show = bool(self.progress) and self.is_main
        bars = show and _use_bars(self.progress)
        per_step = [cb for cb in self.callbacks if type(cb).on_train_batch_end is not Callback.on_train_batch_end]
        row: dict = {}
        for _ in tqdm(range(self.epoch, self.epochs), desc=self.description, disable=not bars, initial=self.epoch,
                      total=self.epochs):
            self.epoch_start = time.perf_counter()
            epoch = self.epoch + 1
            try:
                stats = train_epoch(
                    self.train_model, self.batches.epoch(self.epoch), self.optimizer, loss=self.loss,
                    regularizer=self.regularizer, amp=self.amp, scaler=self.scaler,
                    scheduler=self.scheduler if self.scheduler_step == "step" else None,
                    channels_last=self.channels_last, progress=bars, description=f"epoch {epoch}",
                    log_every=self.log_every, total=self.batches.num_batches,
                    on_step=(lambda step: [cb.on_train_batch_end(self, step) for cb in per_step]) if per_step else None)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"{exc} in epoch {epoch}: {self.saved_note()}. Lower the learning rate or "
                                         "check the data for NaN/inf") from exc
            lr_now = self.optimizer.param_groups[-1]["lr"]
            if self.scheduler is not None and self.scheduler_step == "epoch":
                self.scheduler.step()
            if self.dist_ctx is not None:
                # Ranks see equal shares, so the plain mean over ranks is the epoch's mean.
                loss, accuracy, penalty, speed = D.average_stats(
                    [stats.loss, stats.accuracy, stats.penalty, stats.images_per_second], self.device)
                stats = EpochStats(loss, accuracy, penalty, speed * self.dist_ctx.world_size)
            if not _finite_state(self.model):
                raise NonFiniteLossError(f"the model's weights or running statistics became non-finite in epoch "
                                         f"{epoch}: {self.saved_note()}")
            self.epoch = epoch
            row = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "penalty": stats.penalty, "lr": lr_now, "images_per_second": stats.images_per_second}
            shapes = _shapes(self.model)
            for cb in self.callbacks:
                cb.on_epoch_end(self, row)
            if _shapes(self.model) != shapes:
                self._narrowed()
            if show and not bars:
                print(_line(self.description, epoch, self.epochs, row), flush=True)
            if self.dist_ctx is not None:
                D.barrier()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return dict(self.best, epoch=self.best["epoch"] if self.best["epoch"] is not None else self.epoch, metrics=row)

    def _narrowed(self) -> None:
        """A callback narrowed the model: fresh gradient accumulators and wrappers, the
        regulariser rebound, and (torchrun) every rank checked to hold the same network."""
        from . import distributed as D
        from .pruning import architecture_json

        _forget_grad_accumulators(self.model)
        if self.regularizer is not None:
            self.regularizer.rebind(self.model)
        if self.dist_ctx is not None:
            D.check_same(architecture_json(self.model), self.device, "the model's architecture after a callback")
        self._wrap()


def _line(description: str, epoch: int, epochs: int, row: dict) -> str:
    def fmt(key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    return (f"{description} epoch {epoch}/{epochs}: loss {fmt('train_loss', '.4f')} acc {fmt('train_accuracy', '.4f')} "
            f"penalty {fmt('penalty', '.4g')} val {fmt('val_accuracy', '.4f')} test {fmt('test_accuracy', '.4f')} "
            f"lr {fmt('lr', '.3g')} ({row['images_per_second']:,.0f} img/s)")


def _finite_state(model: nn.Module) -> bool:
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())


OLD_BUDGET_RUN = ("this checkpoint is a budget run of an older rnip_ext (its schedule state has an older format) and "
                  "cannot be continued by this version: start it over (rnip train --overwrite) or finish it with the "
                  "version that wrote it")


def upgrade_checkpoint(payload: dict) -> dict:
    """A ``last.pt`` payload in this version's format: the current one as it is, a train run written
    before it converted; ``ValueError`` for a budget run of an older version (its schedule state
    cannot be continued) or an unknown format."""
    if payload.get("format") == FORMAT:
        return payload
    if payload.get("format") is not None:
        raise ValueError(f"unknown checkpoint format {payload['format']!r} (this rnip_ext writes {FORMAT!r})")
    if payload.get("callback") is not None:
        raise ValueError(OLD_BUDGET_RUN)
    best = {"val_accuracy": payload.get("best_val"), "epoch": payload.get("best_epoch"),
            "test_accuracy": payload.get("best_test")}
    regularizer = payload.get("regularizer")
    if regularizer is None and payload.get("strength") is not None:
        regularizer = {"strength": payload["strength"]}
    return dict(payload, format=FORMAT, regularizer=regularizer, callbacks={"best": best})


def fit(model: nn.Module, data, *, epochs: int, resume_from: dict | None = None, **kwargs) -> dict:
    """Train ``model`` on ``data`` for ``epochs``: ``Trainer(model, data, epochs=epochs, **kwargs).fit(resume_from)``.

    ``data``: an :class:`~rnip_ext.data.InMemoryDataset` (augmented on the device) or
    :class:`~rnip_ext.data.DataSplits` (its ``train``), a ``DataLoader`` (used as it is; under
    torchrun it needs a ``DistributedSampler``, whose ``set_epoch`` is called), a map-style
    ``Dataset`` (shuffled with the trainer's seeded generator, ``batch_size``, ``num_workers``
    worker processes, a ``DistributedSampler`` under torchrun) or an ``IterableDataset`` (it must
    shard itself under torchrun). Batches are ``(inputs, targets)``.

    Keyword arguments: ``optimizer`` (default: the paper's SGD from :func:`make_optimizer` with
    ``lr``, ``weight_decay``, ``bn_lr_scale``, and :func:`make_scheduler`'s schedule),
    ``scheduler`` with ``scheduler_step`` (``"epoch"`` or ``"step"``), ``scaler`` (a ``GradScaler``;
    default: one when ``amp="fp16"``), ``loss`` (``loss(out,
    targets)``, default cross-entropy), ``regularizer`` (a
    :class:`~rnip_ext.regularizers.Regularizer`, e.g. a :class:`~rnip_ext.BudgetPruner`),
    ``callbacks`` (:func:`rnip_ext.callbacks.run_callbacks` gives evaluation, ``best.pt``,
    ``metrics.jsonl`` and ``last.pt`` in a run directory), ``batch_size``, ``seed`` (shuffling and
    augmentation), ``amp`` (``"none"``, ``"bf16"``, ``"fp16"`` with a ``GradScaler``),
    ``channels_last``, ``compile``, ``dist_ctx`` (torchrun: :mod:`rnip_ext.distributed`; DDP, rank
    0 evaluates and writes), ``num_workers``, ``progress`` (``True``: tqdm bars on a terminal, one
    line per epoch otherwise; ``"bar"``/``"lines"``; ``False``), ``description``, ``log_every``.

    ``resume_from`` (a :meth:`Trainer.checkpoint`, e.g. ``load_checkpoint(out/last.pt)``)
    continues after its epoch: the model is narrowed in place to its architecture first, then
    every state is restored; with the in-memory or ``Dataset`` sources the same batches and
    augmentations follow (bitwise equal to an uninterrupted run on CPU). Checkpoints of runs
    written before this format resume too, except budget runs (a clear ``ValueError``). A NaN/inf
    loss raises :class:`NonFiniteLossError` saying what the last checkpoint holds.
    """
    return Trainer(model, data, epochs=epochs, **kwargs).fit(resume_from)
