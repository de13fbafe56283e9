"""``rnip train``: the paper's training protocol with model selection on a validation split.

Argument parsing and run-directory rules only; the loop is :func:`rnip_ext.training.fit`.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from .. import distributed as D
from .. import rundir
from ..budget import BUDGET_SHIFT, START_STRENGTH
from ..callbacks import run_callbacks
from ..data import CIFAR_FILES
from ..nn import convert_sync_batchnorm
from ..pipeline import (ARCHS, DATASET_CHOICES, budget_summary, build_model, image_size_for,  # noqa: F401
                        load_splits, resolve_threads)
from ..pruner import UPDATES, BudgetPruner
from ..pruning import count_flops, count_params
from ..rundir import OutputDirError, record
from ..training import (FIT_SETTINGS, METHODS, NonFiniteLossError, bn_kind, default_strength, fit, make_optimizer,
                        make_regularizer, make_scheduler)
from .errors import Interrupted, UserError, user_errors
from .runs import CheckpointError, load_checkpoint, read_json, versions, write_json

# Every layer of a budget run keeps at least this many channels (the planner's default).
BUDGET_MIN_CHANNELS = 3
# Settings that must match to resume a run (the rest, e.g. --epochs or --device, may change).
# --epochs is one of them: the lr milestones sit at 50% and 75% of it.
RESUME_KEYS = ("arch", "dataset", "method", "strength", "shift", "penalty", "seed", "batch_size", "lr", "val_fraction",
               "weight_decay", "bn_lr_scale", "image_size", "mean", "std", "epochs", "target_flops", "receded_below",
               "receding")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default="vgg16", help="network: the paper's VGG-16 or ResNet-56, or the demo's small VGG")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default="digits",
                   help="digits ships with scikit-learn (no download); imagefolder streams DIR/train/<class>/*.jpg|png "
                        "(DIR/val, DIR/test optional) from --data-dir with worker processes")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py / cifar-100-python, or the image folder (required for "
                        "CIFAR and imagefolder)")
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder/digits: images are resized to this square size (default 32; digits: 16 for "
                        "vgg_small, 32 otherwise)")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="imagefolder: per-channel mean of the normalisation (default ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="imagefolder: per-channel std of the normalisation (default ImageNet's)")
    p.add_argument("--workers", type=int, default=None,
                   help="imagefolder: data-loading worker processes (default min(4, CPUs))")
    p.add_argument("--download", action="store_true", help="fetch CIFAR with torchvision (if installed)")
    p.add_argument("--method", choices=METHODS, default="rni",
                   help="rni: receding regulariser on bounded BatchNorm; l1: network slimming; polarization; none")
    p.add_argument("--strength", type=float, default=None, help="regulariser strength (default: the paper's for --method and --arch)")
    p.add_argument("--shift", type=float, default=None, help="receding shift b (default: the paper's for --arch)")
    p.add_argument("--penalty", choices=("layer", "paper"), default="layer",
                   help="rni only: the receding penalty on layer-relative scales (a layer cannot recede as a "
                        "whole behind the next BatchNorm) or the paper's formulation on sigmoid(w + shift)")
    p.add_argument("--epochs", type=int, default=160, help="training epochs (lr / 10 at 50%% and 75%%)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate, > 0")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (per process under torchrun)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay of convs and linear layers")
    p.add_argument("--bn-lr-scale", type=float, default=10.0, help="BatchNorm learning-rate multiplier")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the CIFAR training set held out for model selection, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, split, shuffling and augmentation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="train in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--target-flops", type=float, default=None,
                   help="train to this fraction of the network's FLOPs (MACs) in one run, in (0, 1]: receded "
                        "channels leave after each epoch, the penalty focused on the channels the planner would "
                        "remove next (rnip_ext.BudgetPruner; needs --method rni)")
    p.add_argument("--receded-below", type=float, default=None,
                   help="with --target-flops: a channel is receded when its importance is below T, in (0, 1) "
                        "(default 0.01)")
    p.add_argument("--receding", choices=UPDATES, default=None,
                   help="with --target-flops: 'decoupled' (default) moves the focused logits after each optimiser "
                        "step, outside the optimiser; 'loss' adds the penalty to the loss (the paper's way)")
    add_threads_argument(p, "auto")
    p.add_argument("--out", required=True,
                   help="run directory: must be new, empty, or this run being resumed (required)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, deleting only the files an earlier rnip run wrote there")
    p.add_argument("--no-progress", action="store_true", help="print nothing per epoch")


def add_threads_argument(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--threads", default=default,
                   help="CPU threads for torch: a number, or 'auto' (the CPUs not busy by the load average; torch's "
                        "setting when OMP_NUM_THREADS is set)")


def parse_threads(value: str) -> int:
    """``--threads``: a number >= 1, or ``auto`` (:func:`rnip_ext.pipeline.resolve_threads`)."""
    if value != "auto":
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"--threads must be a number >= 1 or 'auto', got {value!r}") from None
        check_number("threads", value, low=1)
    return resolve_threads(value)


def apply_threads(value: str) -> int:
    """Set torch's CPU threads from ``--threads``; returns the count."""
    threads = parse_threads(value)
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a device is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    return torch.device(name)


def check_number(name: str, value: float, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = True) -> None:
    """``value`` finite and within the bounds, else a :class:`UserError` naming ``--name``."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"in {left}{low}, {high}{right}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
        raise UserError(f"--{name} must be {span}, got {value}")


def resolve_config(args: argparse.Namespace) -> dict:
    """Every setting of the run, resolved (the paper's defaults filled in) and validated."""
    strength, shift = default_strength(args.method, args.arch)
    target = getattr(args, "target_flops", None)
    receding = getattr(args, "receding", None)
    if target is not None and args.method == "rni":
        # A budget run starts BudgetPruner's controller at the focused penalty's strength.
        strength, shift = START_STRENGTH[receding or "decoupled"], BUDGET_SHIFT
    dataset = args.dataset
    image_size = getattr(args, "image_size", None)
    mean, std = getattr(args, "mean", None), getattr(args, "std", None)
    config = {
        "arch": args.arch, "dataset": dataset, "data_dir": args.data_dir, "method": args.method,
        "strength": strength if args.strength is None else args.strength,
        "shift": shift if args.shift is None else args.shift,
        "penalty": getattr(args, "penalty", "layer") if args.method == "rni" else None,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
        "bn_lr_scale": args.bn_lr_scale, "val_fraction": args.val_fraction, "seed": args.seed,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "image_size": image_size if image_size is not None else (
            32 if dataset == "imagefolder" else image_size_for(args.arch, dataset)),
        "mean": list(mean) if mean else None, "std": list(std) if std else None,
        "bn": bn_kind(args.method),
        "optimizer": "SGD(momentum=0.9, nesterov=True)", "schedule": "lr/10 at 50% and 75% of epochs",
    }
    check_number("epochs", config["epochs"], low=1)
    check_number("batch-size", config["batch_size"], low=1)
    check_number("lr", config["lr"], low=0, low_open=True)
    check_number("strength", config["strength"], low=0)
    check_number("shift", config["shift"])
    check_number("weight-decay", config["weight_decay"], low=0)
    check_number("bn-lr-scale", config["bn_lr_scale"], low=0, low_open=True)
    # Model selection needs a validation split (never the test set); digits use a fixed split,
    # but a value outside (0, 1) is a mistake there too.
    check_number("val-fraction", config["val_fraction"], low=0, high=1, low_open=True)
    if image_size is not None:
        if dataset.startswith("cifar"):
            raise UserError("--image-size applies to imagefolder and digits; CIFAR images are 32x32")
        check_number("image-size", image_size, low=1)
    if (mean or std) and dataset != "imagefolder":
        raise UserError("--mean and --std apply to --dataset imagefolder")
    for name, values in (("std", std or ()),):
        for v in values:
            check_number(name, v, low=0, low_open=True)
    below = getattr(args, "receded_below", None)
    if target is None and (below is not None or receding is not None):
        raise UserError("--receded-below and --receding need --target-flops")
    if target is not None:
        check_number("target-flops", target, low=0, high=1, low_open=True, high_open=False)
        below = 0.01 if below is None else below
        check_number("receded-below", below, low=0, high=1, low_open=True)
        if config["method"] != "rni":
            raise UserError(f"--target-flops trains with the receding regulariser: it needs --method rni, "
                            f"got {config['method']}")
        receding = receding or "decoupled"
        config.update(budget=f"BudgetPruner(receding={receding!r}, scope='local', geometric schedule after 2 "
                             "epochs, budget at 1/3 of epochs)", min_channels=BUDGET_MIN_CHANNELS)
    config.update(target_flops=target, receded_below=below, receding=receding)
    if config["dataset"] in CIFAR_FILES and config["data_dir"] is None:
        raise UserError(f"--dataset {config['dataset']} needs --data-dir (the folder holding "
                        f"{CIFAR_FILES[config['dataset']][0]})")
    if config["dataset"] == "imagefolder" and config["data_dir"] is None:
        raise UserError("--dataset imagefolder needs --data-dir (a folder holding train/<class>/<image> files)")
    return config


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
    from ..training import upgrade_checkpoint

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
    from ..plots import plot_budget_training

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no budget_training.png (pip install matplotlib)")
        return
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    record(out, "budget_training.png")
    print(f"wrote {plot_budget_training(rows, os.path.join(out, 'budget_training.png'))}")


def run(args: argparse.Namespace) -> dict:
    """Train one run; under torchrun (``WORLD_SIZE`` > 1) as one rank of a DDP job."""
    dist_ctx = D.context_from_env()
    if dist_ctx is None:
        return _run(args, None)
    try:
        return _run(args, dist_ctx)
    finally:
        D.teardown()


def _run(args: argparse.Namespace, dist_ctx: D.DistributedContext | None) -> dict:
    is_main = dist_ctx is None or dist_ctx.is_main
    config = resolve_config(args)
    out = args.out
    if args.resume and getattr(args, "overwrite", False):
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    elastic = elastic_state(out) if dist_ctx is not None else None
    resume = args.resume or elastic == "resume"
    mode = None
    if is_main:
        with user_errors(OutputDirError):
            mode = rundir.check(out, "train", resume=resume, overwrite=args.overwrite,
                                replace_own=elastic == "restart",
                                hint="pass --resume to continue it, --overwrite to start over, or choose another --out")
    resume_from = read_resume(out, config) if resume else None
    threads = apply_threads(args.threads)

    # Every rank seeds alike, so models start identical (DDP also broadcasts rank 0's).
    torch.manual_seed(config["seed"])
    if dist_ctx is None:
        device = resolve_device(config["device"])
    else:
        with user_errors(RuntimeError):
            device = D.setup(dist_ctx, config["device"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_splits(config, device, download=args.download)
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    config.update({"num_classes": splits.num_classes, "in_channels": splits.in_channels,
                   "image_size_used": splits.image_size, "resolved_device": str(device), "versions": versions(),
                   "params": count_params(model), "flops": count_flops(model, example), "threads": threads,
                   "train_size": len(splits.train), "val_size": len(splits.val),
                   "test_size": len(splits.test) if splits.test is not None else 0})
    if dist_ctx is not None:
        # Per-process batch: the global batch is world_size * batch_size.
        config["world_size"] = dist_ctx.world_size
        config["elastic_run_id"] = os.environ.get("TORCHELASTIC_RUN_ID")
        model = convert_sync_batchnorm(model)
    # The paper's recipe, built here so that a budget run's pruner counts its steps from the start.
    optimizer = make_optimizer(model, config["lr"], config["weight_decay"], config["bn_lr_scale"])
    scheduler = make_scheduler(optimizer, config["epochs"])
    # A bad budget (e.g. unreachable with min_channels) is refused before anything is written.
    pruner = make_pruner(model, config, example, optimizer) if config["target_flops"] is not None else None
    regularizer = pruner if pruner is not None else make_regularizer(
        model, config["method"], config["strength"], config["shift"], config["penalty"] or "layer")
    workers = args.workers if args.workers is not None else (
        min(4, os.cpu_count() or 1) if config["dataset"] == "imagefolder" else 0)
    check_number("workers", workers, low=0)
    created = False
    if is_main:
        with user_errors(OutputDirError):
            created = rundir.claim(out, "train", mode)
        write_run_json(out, "config.json", config)
    try:
        best = fit(model, splits, epochs=config["epochs"], resume_from=resume_from, optimizer=optimizer,
                   scheduler=scheduler, regularizer=regularizer,
                   callbacks=run_callbacks(out, splits, budget=pruner, num_workers=workers), num_workers=workers,
                   progress=is_main and not args.no_progress, description=f"train {config['method']}",
                   dist_ctx=dist_ctx, **fit_settings(config))
    except KeyboardInterrupt:
        saved = os.path.isfile(os.path.join(out, "last.pt"))
        removed = is_main and rundir.release(out, created)
        raise Interrupted(out, saved, removed) from None
    except NonFiniteLossError as exc:
        if is_main:
            rundir.release(out, created)
        raise UserError(str(exc)) from exc
    summary = {"kind": "train", "arch": config["arch"], "dataset": config["dataset"], "method": config["method"],
               "ratio": 0.0, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
               "test_accuracy": best["test_accuracy"], "params": config["params"], "flops": config["flops"]}
    if config["target_flops"] is not None:
        summary.update(budget_summary(build_model(config, splits.num_classes, splits.in_channels), model,
                                      example, config["target_flops"]))
    if not is_main:
        return summary
    write_run_json(out, "summary.json", summary)
    if config["target_flops"] is not None:
        _budget_plot(out)
    test = "-" if best["test_accuracy"] is None else f"{best['test_accuracy']:.4f}"
    print(f"{config['method']}: best epoch {best['epoch']} val {best['val_accuracy']:.4f} test {test} -> {out}")
    return summary
