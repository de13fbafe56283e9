"""The paper's training recipe as reusable pieces: regulariser by method, optimiser, one epoch, evaluation.

Recipe (Suteu & Guo): SGD with Nesterov momentum 0.9, lr 0.1 divided by 10 at 50% and 75% of
the epochs, weight decay 1e-4 on convolutions and linear layers, BatchNorm parameters with 10x
the learning rate and no weight decay. :func:`fit` is the whole loop with checkpoints and
resume, the one the CLI (:mod:`rnip_ext.cli`) runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import InMemoryDataset
from .nn import BoundedBatchNorm2d
from .regularizers import L1Regularizer, PolarizationRegularizer, RecedingRegularizer, param_groups

__all__ = [
    "METHODS",
    "DEFAULT_STRENGTH",
    "EpochStats",
    "FitState",
    "NonFiniteLossError",
    "bn_kind",
    "default_strength",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_regularizer",
    "make_scheduler",
    "train_epoch",
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
    """What one training epoch measured."""

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


def _crash_hook(step: int) -> None:
    """Test-only fault injection for the elastic-restart test (see :func:`fit`)."""
    os.kill(os.getpid(), signal.SIGKILL)


def train_epoch(model: nn.Module, data: InMemoryDataset, optimizer, batch_size: int, regularizer=None, *,
                amp: str = "none", scaler=None, channels_last: bool = False, generator=None,
                progress: bool = True, description: str = "train", log_every: int = 50,
                _crash_at_step: int | None = None) -> EpochStats:
    """One epoch of ``cross_entropy + reg()`` with augmentation; mean loss, accuracy, penalty, images/s.

    Loss, correct predictions and penalty are summed on the device (``sum_i loss_i * n_i`` over
    batches) and read back once at the end of the epoch, and every ``log_every`` steps while a
    progress bar is shown: no per-step host synchronisation. Raises :class:`NonFiniteLossError`
    at the first read-back that sees a NaN/inf loss or penalty (the optimiser has then already
    stepped on it, so the model in memory is no longer usable; checkpoints are untouched).
    """
    from tqdm.auto import tqdm

    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    model.train()
    device = data.images.device
    # [loss * n, correct, penalty * n] accumulated on the device.
    sums = torch.zeros(3, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    total = 0
    start = time.perf_counter()
    drop_last = len(data) > batch_size
    batches = data.batches(batch_size, shuffle=True, augment=True, generator=generator, drop_last=drop_last)
    bar = tqdm(batches, total=data.num_batches(batch_size, drop_last=drop_last), desc=description,
               leave=False, disable=not progress)

    def read_back() -> list[float]:
        loss_sum, correct, penalty_sum = sums.tolist()
        if not (math.isfinite(loss_sum) and math.isfinite(penalty_sum)):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss_sum / max(total, 1):g}, penalty {penalty_sum / max(total, 1):g})"
            )
        return [loss_sum / max(total, 1), correct / max(total, 1), penalty_sum / max(total, 1)]

    for step, (x, y) in enumerate(bar, 1):
        if _crash_at_step == step:
            _crash_hook(step)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        penalty = regularizer() if regularizer is not None else None
        total_loss = loss if penalty is None else loss + penalty
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total_loss.backward()
            optimizer.step()
        if isinstance(regularizer, PolarizationRegularizer):
            regularizer.clamp_()
        n = y.shape[0]
        total += n
        with torch.no_grad():
            sums[0] += loss.detach().double() * n
            sums[1] += (out.argmax(1) == y).sum()
            if penalty is not None:
                sums[2] += penalty.detach().double() * n
        if progress and step % log_every == 0:
            loss_mean, acc, _ = read_back()
            bar.set_postfix(loss=f"{loss_mean:.3f}", acc=f"{acc:.3f}")
    loss_mean, acc, penalty_mean = read_back()
    elapsed = time.perf_counter() - start
    return EpochStats(loss_mean, acc, penalty_mean, total / max(elapsed, 1e-9))


@torch.no_grad()
def evaluate(model: nn.Module, data: InMemoryDataset, batch_size: int = 256, *, amp: str = "none",
             channels_last: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode."""
    model.eval()
    device = data.images.device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in data.batches(batch_size):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            correct += (model(x).argmax(1) == y).sum()
    return correct.item() / max(len(data), 1)


@dataclass
class FitState:
    """What :func:`fit` hands its ``on_epoch_end`` callback after each epoch.

    ``epoch`` is the number of epochs finished (1-based), ``metrics`` that epoch's row of
    ``metrics.jsonl`` (written after the callback returns, so the callback may add keys; on
    ranks other than 0 under torchrun it holds the training statistics only). ``is_main`` is
    whether this process writes (rank 0, or no torchrun).

    The callback may replace ``model``, ``optimizer``, ``scheduler`` and ``regularizer``; the
    next epoch trains what it leaves there. Pruning between epochs (the contract):

    * set ``state.model`` to the narrower model made with
      ``rnip_ext.pruning.apply(state.model, plan, optimizer=state.optimizer)`` (or a
      :class:`rnip_ext.pruning.RecedingSchedule` step): the optimiser is rebound in place, so
      the scheduler and the ``GradScaler`` keep working and nothing else needs replacing. A new
      model whose parameters are not exactly the optimiser's is a ``ValueError`` (build a new
      optimiser *and* scheduler and put both in the state instead);
    * :func:`fit` then rebinds the regulariser (``regularizer.rebind(model)``, when it has one),
      rebuilds the ``torch.compile``'d runner and the ``DistributedDataParallel`` wrapper, and
      under torchrun checks that every rank holds the same architecture (the callback runs on
      every rank; ranks see identical weights after DDP's all-reduce, so a decision made from
      the weights is the same everywhere).

    Replacing the optimiser requires replacing the scheduler too (it is bound to the optimiser).
    """

    epoch: int
    epochs: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    regularizer: object
    metrics: dict
    is_main: bool = True


# Settings of a run that :func:`fit` reads from a CLI config dict (see ``rnip_ext.cli.train``).
FIT_SETTINGS = ("lr", "batch_size", "weight_decay", "bn_lr_scale", "seed", "amp", "channels_last", "compile")
CRASH_ENV = "RNIP_TEST_CRASH_AT"


def _crash_step(epoch: int, rank: int) -> int | None:
    """Test-only: ``RNIP_TEST_CRASH_AT=RANK:EPOCH:STEP`` SIGKILLs that rank at that step of that
    (1-based) epoch, on the first attempt of a torchrun job only (``TORCHELASTIC_RESTART_COUNT``
    unset or 0), to simulate a worker dying. Never set it outside tests."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        return None
    want_rank, want_epoch, want_step = (int(v) for v in spec.split(":"))
    return want_step if (want_rank, want_epoch) == (rank, epoch) else None


def _finite_state(model: nn.Module) -> bool:
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())


def _use_bars(progress) -> bool:
    if progress in ("bar", "lines"):
        return progress == "bar"
    return sys.stdout.isatty() and sys.stderr.isatty()


def fit(model: nn.Module, splits, out: str | os.PathLike, *, epochs: int, lr: float = 0.1, batch_size: int = 64,
        weight_decay: float = 1e-4, bn_lr_scale: float = 10.0, seed: int = 0, amp: str = "none",
        channels_last: bool = False, compile: bool = False, regularizer=None, resume_from: dict | None = None,
        progress: bool | str = True, description: str = "train", dist_ctx=None, on_epoch_end=None,
        log_every: int = 50, selectable=None) -> dict:
    """Train ``model`` on ``splits`` for ``epochs`` with the paper's recipe, checkpointing into ``out``.

    Per epoch: one pass of ``cross_entropy + regularizer()`` (:func:`train_epoch`; SGD Nesterov
    0.9 from :func:`make_optimizer`, lr / 10 at 50% and 75% of ``epochs``), top-1 accuracy on
    ``splits.val`` and ``splits.test``, one row appended to ``out/metrics.jsonl``,
    ``out/best.pt`` when the validation accuracy improves (``{"model", "architecture", "epoch"}``),
    then ``on_epoch_end(FitState)`` if given (it may prune the model: see :class:`FitState`),
    then the epoch's row of ``out/metrics.jsonl`` and ``out/last.pt`` with everything a resume
    needs (model, architecture, optimiser, scheduler, scaler, generator and torch RNG states, the
    regulariser's ``strength`` (and its ``state_dict()`` when it has one, e.g. a focus), the
    callback's ``state_dict()`` when it has one, best so far; all
    written atomically, loadable with ``weights_only=True``). Returns ``{"val_accuracy",
    "epoch", "test_accuracy"}`` of the best epoch (model selection on validation only; with
    ``selectable``, a callable taking the model, only epochs whose model it accepts compete,
    e.g. those within a FLOPs budget).

    Checkpoints hold the model's current architecture (``"architecture"``, the JSON of
    :func:`rnip_ext.pruning.io.architecture_json`) next to its ``state_dict``, so a model pruned
    during training is restored by narrowing a fresh, unpruned one
    (:func:`rnip_ext.pruning.restore`); a resumed run narrows ``model`` first, then builds the
    optimiser and rebinds the regulariser. Checkpoints without it (older runs) load as before.
    Pruning between epochs rebuilds the compiled runner: with ``compile=True`` each prune
    costs one recompilation (the shapes changed), which is expected.

    Without ``resume_from``, ``out`` must not hold ``metrics.jsonl``, ``best.pt`` or ``last.pt``
    yet (:class:`rnip_ext.rundir.OutputDirError` otherwise): a fresh run never replaces another's.
    ``resume_from`` (a ``last.pt`` payload, :func:`rnip_ext.rundir.load_checkpoint`) continues
    after its epoch; rows of later epochs in ``metrics.jsonl`` (written before a crash) are
    dropped, so every epoch appears once. A resumed run replays the same batches and
    augmentations; results equal an uninterrupted run's up to floating-point nondeterminism of
    the device (bitwise on CPU).

    ``progress``: ``True`` shows tqdm bars when stdout and stderr are terminals and one printed
    line per epoch otherwise; ``"bar"``/``"lines"`` force either; ``False`` prints nothing.
    A NaN/inf loss raises :class:`NonFiniteLossError` before anything of that epoch is written,
    and a model state with NaN/inf values is never checkpointed: ``last.pt`` keeps the last good
    epoch. Under torchrun pass ``dist_ctx`` (:mod:`rnip_ext.distributed`): the model trains
    under ``DistributedDataParallel`` on this rank's shard; rank 0 alone evaluates and writes.
    """
    from tqdm.auto import tqdm

    from . import distributed as D
    from .rundir import OutputDirError, append_jsonl, record, save_checkpoint

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = os.fspath(out)
    from .pruning.io import architecture_json, restore

    device = splits.train.images.device
    is_main = dist_ctx is None or dist_ctx.is_main
    rank = 0 if dist_ctx is None else dist_ctx.rank
    if resume_from is not None and resume_from.get("architecture"):
        # A run that pruned while training: narrow the fresh model before the optimiser sees it.
        restore(model, resume_from["model"], resume_from["architecture"])
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        _rebind(regularizer, model)
    optimizer = make_optimizer(model, lr, weight_decay, bn_lr_scale)
    scheduler = make_scheduler(optimizer, epochs)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    generator = torch.Generator().manual_seed(seed)
    start_epoch, best = 0, {"val_accuracy": -1.0, "epoch": -1, "test_accuracy": None}
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        if scaler is not None and resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        generator.set_state(resume_from["generator"])
        torch.set_rng_state(resume_from["torch_rng"])
        start_epoch = int(resume_from["epoch"]) + 1
        if resume_from.get("strength") is not None and regularizer is not None:
            regularizer.strength = float(resume_from["strength"])
        if resume_from.get("regularizer") is not None and callable(getattr(regularizer, "load_state_dict", None)):
            regularizer.load_state_dict(resume_from["regularizer"])  # e.g. a RecedingRegularizer's focus
        if resume_from.get("callback") is not None and callable(getattr(on_epoch_end, "load_state_dict", None)):
            on_epoch_end.load_state_dict(resume_from["callback"])
        best = {"val_accuracy": float(resume_from["best_val"]), "epoch": int(resume_from["best_epoch"]),
                "test_accuracy": resume_from.get("best_test")}

    def wrap(m: nn.Module):
        runner = torch.compile(m) if compile else m
        if dist_ctx is None:
            return runner, runner
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)
        return runner, (torch.compile(ddp) if compile else ddp)

    runner, train_runner = wrap(model)
    train_data = splits.train if dist_ctx is None else D.ShardedDataset(splits.train, dist_ctx.rank,
                                                                         dist_ctx.world_size)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if is_main and resume_from is None:
        # A fresh run never replaces another's files (the CLI clears its own first on --overwrite).
        existing = [f for f in ("metrics.jsonl", "best.pt", "last.pt") if os.path.exists(os.path.join(out, f))]
        if existing:
            raise OutputDirError(f"{out} already holds {', '.join(existing)}: pass resume_from="
                                 "load_checkpoint(<out>/last.pt) to continue that run, or use another directory")
    if is_main:
        os.makedirs(out, exist_ok=True)
        record(out, "metrics.jsonl", "best.pt", "last.pt")
        _drop_rows_after(metrics_path, start_epoch)
    show = bool(progress) and is_main
    bars = show and _use_bars(progress)
    last_saved = start_epoch
    for epoch in tqdm(range(start_epoch, epochs), desc=description, disable=not bars, initial=start_epoch,
                      total=epochs):
        epoch_start = time.perf_counter()
        try:
            stats = train_epoch(train_runner, train_data, optimizer, batch_size, regularizer, amp=amp,
                                scaler=scaler, channels_last=channels_last, generator=generator, progress=bars,
                                description=f"epoch {epoch + 1}", log_every=log_every,
                                _crash_at_step=_crash_step(epoch + 1, rank))
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc} in epoch {epoch + 1}: {_kept(out, last_saved)}. Lower the learning "
                                     "rate or check the data for NaN/inf") from exc
        lr_now = optimizer.param_groups[-1]["lr"]
        scheduler.step()
        if dist_ctx is not None:
            # Ranks see equal shares, so the plain mean over ranks is the epoch's mean.
            loss, accuracy, penalty, speed = D.average_stats(
                [stats.loss, stats.accuracy, stats.penalty, stats.images_per_second], device)
            stats = EpochStats(loss, accuracy, penalty, speed * dist_ctx.world_size)
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "penalty": stats.penalty, "lr": lr_now, "images_per_second": stats.images_per_second}
        if is_main:
            if not _finite_state(model):
                raise NonFiniteLossError(f"the model's weights or running statistics became non-finite in epoch "
                                         f"{epoch + 1}: {_kept(out, last_saved)}")
            val = evaluate(runner, splits.val, amp=amp, channels_last=channels_last)
            test = evaluate(runner, splits.test, amp=amp, channels_last=channels_last)
            row.update(val_accuracy=val, test_accuracy=test)
            if val > best["val_accuracy"] and (selectable is None or selectable(model)):
                best = {"val_accuracy": val, "epoch": epoch + 1, "test_accuracy": test}
                save_checkpoint(os.path.join(out, "best.pt"), {"model": model.state_dict(),
                                                               "architecture": architecture_json(model),
                                                               "epoch": epoch})
        if on_epoch_end is not None:
            state = FitState(epoch + 1, epochs, model, optimizer, scheduler, regularizer, row, is_main)
            on_epoch_end(state)
            if state.optimizer is not optimizer and state.scheduler is scheduler:
                raise ValueError("on_epoch_end replaced the optimizer but not the scheduler bound to it")
            if state.model is not model:
                _check_bound(state.model, state.optimizer)
                model = state.model
                if state.regularizer is regularizer:
                    _rebind(regularizer, model)
                runner, train_runner = wrap(model)
            optimizer, scheduler, regularizer = state.optimizer, state.scheduler, state.regularizer
            row = state.metrics
        if dist_ctx is not None:
            D.check_same(architecture_json(model), device, "the model's architecture after on_epoch_end")
        row["wall_seconds"] = time.perf_counter() - epoch_start  # the epoch: train, evaluate, callback
        row["time"] = time.time()
        if is_main:
            append_jsonl(metrics_path, row)
            save_checkpoint(os.path.join(out, "last.pt"), {
                "model": model.state_dict(), "architecture": architecture_json(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                "best_val": best["val_accuracy"], "best_epoch": best["epoch"], "best_test": best["test_accuracy"],
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "strength": float(regularizer.strength) if isinstance(getattr(regularizer, "strength", None),
                                                                       (int, float)) else None,
                "callback": on_epoch_end.state_dict() if callable(getattr(on_epoch_end, "state_dict", None)) else None,
                "regularizer": regularizer.state_dict() if callable(getattr(regularizer, "state_dict", None)) else None,
            })
            last_saved = epoch + 1
            if show and not bars:
                print(f"{description} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f} acc {stats.accuracy:.4f} "
                      f"penalty {stats.penalty:.4g} val {row['val_accuracy']:.4f} test {row['test_accuracy']:.4f} "
                      f"lr {lr_now:.3g} ({stats.images_per_second:,.0f} img/s)", flush=True)
        if dist_ctx is not None:
            D.barrier()
    return best


def _rebind(regularizer, model: nn.Module) -> None:
    """Point a regulariser that can follow a pruned model (``rebind``) at ``model``'s layers."""
    if regularizer is not None and callable(getattr(regularizer, "rebind", None)):
        regularizer.rebind(model)


def _check_bound(model: nn.Module, optimizer) -> None:
    """The optimiser must serve exactly the new model's parameters (rebound by ``apply``)."""
    have = {id(p) for g in optimizer.param_groups for p in g["params"]}
    want = {id(p) for p in model.parameters()}
    if have != want:
        raise ValueError("on_epoch_end replaced the model but the optimizer still serves other parameters: prune "
                         "with rnip_ext.pruning.apply(model, plan, optimizer=state.optimizer), or put a new optimizer "
                         "and scheduler in the state")


def _kept(out: str, last_saved: int) -> str:
    if last_saved == 0:
        return "nothing of this run was checkpointed"
    return f"{os.path.join(out, 'last.pt')} still holds epoch {last_saved}, untouched"


def _drop_rows_after(path: str, epoch: int) -> None:
    """Keep the metrics rows of epochs ``<= epoch`` (later ones died before their checkpoint)."""
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
    from .rundir import _atomic

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(rows)

    _atomic(path, write)
