"""``rnip train`` as a library call: :func:`train` runs a :class:`~rnip_ext.app.spec.TrainSpec` into its run directory.

The loop is :func:`rnip_ext.training.fit`; this module adds the run directory (ownership, resume,
torchrun restarts), the budget pruner of a ``target_flops`` run, and the summary.
"""

from __future__ import annotations

import json
import os

import torch

from .. import distributed as D
from .. import rundir
from ..callbacks import run_callbacks
from ..nn import convert_sync_batchnorm
from ..pruner import BudgetPruner
from ..pruning import count_flops, count_params
from ..rundir import CheckpointError, OutputDirError, load_checkpoint, read_json, record, write_json
from ..training import (FIT_SETTINGS, NonFiniteLossError, fit, make_optimizer, make_regularizer, make_scheduler,
                        upgrade_checkpoint)
from .errors import Interrupted, UserError, user_errors
from .measure import versions
from .plots import plot_budget_training
from .runs import budget_summary, build_model, load_splits
from .spec import BUDGET_MIN_CHANNELS, TrainSpec, check_option, parse_threads, resolve_device

__all__ = ["RESUME_KEYS", "elastic_state", "fit_settings", "read_resume", "train", "write_run_json"]

# Settings that must match to resume a run (the rest, e.g. --epochs or --device, may change).
# --epochs is one of them: the lr milestones sit at 50% and 75% of it.
RESUME_KEYS = ("arch", "dataset", "method", "strength", "shift", "penalty", "seed", "batch_size", "lr", "val_fraction",
               "weight_decay", "bn_lr_scale", "image_size", "mean", "std", "epochs", "target_flops", "receded_below",
               "receding")


def make_pruner(model, config: dict, example, optimizer) -> BudgetPruner:
    """The run's :class:`~rnip_ext.BudgetPruner` (bad budgets are one ``error:`` line, before anything is written)."""
    with user_errors(ValueError):
        return BudgetPruner(model, example, target_flops=config["target_flops"], epochs=config["epochs"],
                            optimizer=optimizer, threshold=config["receded_below"], min_channels=BUDGET_MIN_CHANNELS,
                            update=config["receding"], strength=config["strength"], shift=config["shift"])


def elastic_state(out: str) -> str | None:
    """After a torchrun restart of this very job (same ``TORCHELASTIC_RUN_ID`` in ``config.json``):
    ``"resume"`` when ``out`` holds its checkpoint, ``"restart"`` when it died before the first
    one; ``None`` otherwise (a first attempt, or someone else's run)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if D.restart_count() == 0 or not run_id:
        return None
    try:
        config = read_json(os.path.join(out, "config.json"))
    except (OSError, CheckpointError):
        return None
    if not isinstance(config, dict) or config.get("elastic_run_id") != run_id:
        return None
    return "resume" if os.path.isfile(os.path.join(out, "last.pt")) else "restart"


def read_resume(out: str, config: dict, keys=RESUME_KEYS, command: str = "train") -> dict:
    """The ``last.pt`` of the run in ``out`` after checking its ``config.json`` matches ``config``."""
    config_path = os.path.join(out, "config.json")
    try:
        old = read_json(config_path)
    except FileNotFoundError:
        raise UserError(f"--resume but {out} holds no {command} run (no config.json)") from None
    except CheckpointError as exc:
        raise UserError(f"cannot resume {out}: {exc}") from exc
    if not isinstance(old, dict):
        raise UserError(f"cannot resume {out}: {config_path} does not hold a run's settings")
    changed = [k for k in keys if old.get(k) != config.get(k)]
    if changed:
        raise UserError(f"cannot resume {out}: settings differ from the run's ({', '.join(changed)})")
    try:
        payload = load_checkpoint(os.path.join(out, "last.pt"))
    except CheckpointError as exc:
        raise UserError(f"cannot resume: {exc}") from exc
    with user_errors(ValueError, prefix=f"cannot resume {out}: "):
        return upgrade_checkpoint(payload)


def write_run_json(out: str, name: str, obj) -> None:
    """Record ``name`` in the run's manifest, then write it atomically."""
    record(out, name)
    write_json(os.path.join(out, name), obj)


def fit_settings(config: dict) -> dict:
    """The keyword arguments of :func:`rnip_ext.training.fit` a run config fixes."""
    return {k: config[k] for k in FIT_SETTINGS}


def _budget_plot(out: str) -> None:
    """FLOPs, strength and accuracy over epochs (``budget_training.png``), when matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no budget_training.png (pip install matplotlib)")
        return
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    record(out, "budget_training.png")
    print(f"wrote {plot_budget_training(rows, os.path.join(out, 'budget_training.png'))}")


def train(spec: TrainSpec) -> dict:
    """Train one run into ``spec.out`` and return its summary (also ``summary.json``); under torchrun
    (``WORLD_SIZE`` > 1) as one rank of a DDP job."""
    dist_ctx = D.context_from_env()
    if dist_ctx is None:
        return _train(spec, None)
    try:
        return _train(spec, dist_ctx)
    finally:
        D.teardown()


def _train(spec: TrainSpec, dist_ctx: D.DistributedContext | None) -> dict:
    is_main = dist_ctx is None or dist_ctx.is_main
    config = spec.config()
    out = spec.out
    elastic = elastic_state(out) if dist_ctx is not None else None
    resume = spec.resume or elastic == "resume"
    mode = None
    if is_main:
        with user_errors(OutputDirError):
            mode = rundir.check(out, "train", resume=resume, overwrite=spec.overwrite,
                                replace_own=elastic == "restart",
                                hint="pass --resume to continue it, --overwrite to start over, or choose another --out")
    resume_from = read_resume(out, config) if resume else None
    threads = parse_threads(spec.threads)
    torch.set_num_threads(threads)

    # Every rank seeds alike, so models start identical (DDP also broadcasts rank 0's).
    torch.manual_seed(config["seed"])
    if dist_ctx is None:
        device = resolve_device(config["device"])
    else:
        with user_errors(RuntimeError):
            device = D.setup(dist_ctx, config["device"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_splits(config, device, download=spec.download)
    model, example = _build(config, splits, device, dist_ctx, threads)
    optimizer, scheduler, pruner, regularizer = _recipe(model, config, example)
    workers = spec.workers if spec.workers is not None else (
        min(4, os.cpu_count() or 1) if config["dataset"] == "imagefolder" else 0)
    check_option("workers", workers, low=0)
    created = False
    if is_main:
        with user_errors(OutputDirError):
            created = rundir.claim(out, "train", mode)
        write_run_json(out, "config.json", config)
    try:
        best = fit(model, splits, epochs=config["epochs"], resume_from=resume_from, optimizer=optimizer,
                   scheduler=scheduler, regularizer=regularizer,
                   callbacks=run_callbacks(out, splits, budget=pruner, num_workers=workers), num_workers=workers,
                   progress=is_main and spec.progress, description=f"train {config['method']}",
                   dist_ctx=dist_ctx, **fit_settings(config))
    except KeyboardInterrupt:
        saved = os.path.isfile(os.path.join(out, "last.pt"))
        removed = is_main and rundir.release(out, created)
        raise Interrupted(out, saved, removed) from None
    except NonFiniteLossError as exc:
        if is_main:
            rundir.release(out, created)
        raise UserError(str(exc)) from exc
    summary = _summary(config, best, splits, model, example)
    if is_main:
        _finish(out, config, best, summary)
    return summary


def record_resolved(config: dict, splits, model, example, device: torch.device, threads: int) -> None:
    """Add to a run's ``config`` what the data, the device and the built network resolved (class
    and channel counts, image size, sizes of the splits, parameters and FLOPs, versions)."""
    config.update({"num_classes": splits.num_classes, "in_channels": splits.in_channels,
                   "image_size_used": splits.image_size, "resolved_device": str(device), "versions": versions(),
                   "params": count_params(model), "flops": count_flops(model, example), "threads": threads,
                   "train_size": len(splits.train), "val_size": len(splits.val),
                   "test_size": len(splits.test) if splits.test is not None else 0})


def _build(config: dict, splits, device: torch.device, dist_ctx, threads: int):
    """The run's network on ``device`` and an example input; records what was resolved in ``config``."""
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    record_resolved(config, splits, model, example, device, threads)
    if dist_ctx is not None:
        # Per-process batch: the global batch is world_size * batch_size.
        config["world_size"] = dist_ctx.world_size
        config["elastic_run_id"] = os.environ.get("TORCHELASTIC_RUN_ID")
        model = convert_sync_batchnorm(model)
    return model, example


def _recipe(model, config: dict, example):
    """The paper's optimiser and schedule, and the regulariser (a budget run's :class:`BudgetPruner`),
    built before training so that the pruner counts its steps from the start."""
    optimizer = make_optimizer(model, config["lr"], config["weight_decay"], config["bn_lr_scale"])
    scheduler = make_scheduler(optimizer, config["epochs"])
    # A bad budget (e.g. unreachable with min_channels) is refused before anything is written.
    pruner = make_pruner(model, config, example, optimizer) if config["target_flops"] is not None else None
    regularizer = pruner if pruner is not None else make_regularizer(
        model, config["method"], config["strength"], config["shift"], config["penalty"] or "layer")
    return optimizer, scheduler, pruner, regularizer


def _summary(config: dict, best: dict, splits, model, example) -> dict:
    summary = {"kind": "train", "arch": config["arch"], "dataset": config["dataset"], "method": config["method"],
               "ratio": 0.0, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
               "test_accuracy": best["test_accuracy"], "params": config["params"], "flops": config["flops"]}
    if config["target_flops"] is not None:
        summary.update(budget_summary(build_model(config, splits.num_classes, splits.in_channels), model,
                                      example, config["target_flops"]))
    return summary


def _finish(out: str, config: dict, best: dict, summary: dict) -> None:
    """Rank 0: ``summary.json``, a budget run's plot, one line on stdout."""
    write_run_json(out, "summary.json", summary)
    if config["target_flops"] is not None:
        _budget_plot(out)
    test = "-" if best["test_accuracy"] is None else f"{best['test_accuracy']:.4f}"
    print(f"{config['method']}: best epoch {best['epoch']} val {best['val_accuracy']:.4f} test {test} -> {out}")
