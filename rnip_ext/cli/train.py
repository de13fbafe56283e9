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
from ..budget import BUDGET_SHIFT, BUDGET_START_STRENGTH, check_budget, train_to_budget
from ..data import CIFAR_FILES, load_dataset
from ..nn import convert_sync_batchnorm
from ..pipeline import ARCHS, budget_summary, build_model, image_size_for  # noqa: F401 (imported from here)
from ..pruning import count_flops, count_params
from ..rundir import OutputDirError, record
from ..training import FIT_SETTINGS, METHODS, NonFiniteLossError, bn_kind, default_strength, fit, make_regularizer
from .errors import Interrupted, UserError, user_errors
from .runs import CheckpointError, load_checkpoint, read_json, versions, write_json

# Every layer of a budget run keeps at least this many channels (the planner's default).
BUDGET_MIN_CHANNELS = 3
# Settings that must match to resume a run (the rest, e.g. --epochs or --device, may change).
# --epochs is one of them: the lr milestones sit at 50% and 75% of it.
RESUME_KEYS = ("arch", "dataset", "method", "strength", "shift", "penalty", "seed", "batch_size", "lr", "val_fraction",
               "weight_decay", "bn_lr_scale", "image_size", "epochs", "target_flops", "prune_every", "receded_below")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default="vgg16", help="network: the paper's VGG-16 or ResNet-56, or the demo's small VGG")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "digits"), default="digits",
                   help="digits ships with scikit-learn (no download)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py / cifar-100-python (required for CIFAR)")
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
                        "channels leave between epochs (the penalty focused on the channels the planner would "
                        "remove next, its strength adapted, default start 2.0, shift 1), the budget is met exactly "
                        "from a third of the epochs on (needs --method rni)")
    p.add_argument("--prune-every", type=int, default=None,
                   help="with --target-flops: remove receded channels every K epochs (default 1)")
    p.add_argument("--receded-below", type=float, default=None,
                   help="with --target-flops: a channel is receded when its importance is below T, in (0, 1) "
                        "(default 0.01)")
    p.add_argument("--out", required=True,
                   help="run directory: must be new, empty, or this run being resumed (required)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, deleting only the files an earlier rnip run wrote there")
    p.add_argument("--no-progress", action="store_true", help="print nothing per epoch")


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
    if getattr(args, "target_flops", None) is not None and args.method == "rni":
        # A budget run starts its controller at the focused penalty's strength (see rnip_ext.budget).
        strength, shift = BUDGET_START_STRENGTH, BUDGET_SHIFT
    config = {
        "arch": args.arch, "dataset": args.dataset, "data_dir": args.data_dir, "method": args.method,
        "strength": strength if args.strength is None else args.strength,
        "shift": shift if args.shift is None else args.shift,
        "penalty": getattr(args, "penalty", "layer") if args.method == "rni" else None,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
        "bn_lr_scale": args.bn_lr_scale, "val_fraction": args.val_fraction, "seed": args.seed,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "image_size": image_size_for(args.arch, args.dataset), "bn": bn_kind(args.method),
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
    target = getattr(args, "target_flops", None)
    every, below = getattr(args, "prune_every", None), getattr(args, "receded_below", None)
    if target is None and (every is not None or below is not None):
        raise UserError("--prune-every and --receded-below need --target-flops")
    if target is not None:
        check_number("target-flops", target, low=0, high=1, low_open=True, high_open=False)
        every = 1 if every is None else every
        below = 0.01 if below is None else below
        if config["epochs"] < 2:
            raise UserError(f"--target-flops needs --epochs >= 2 (the budget is met after one epoch and at least "
                            f"one more trains at it), got {config['epochs']}")
        check_number("prune-every", every, low=1)
        check_number("receded-below", below, low=0, high=1, low_open=True)
        if config["method"] != "rni":
            raise UserError(f"--target-flops trains with the receding regulariser: it needs --method rni, "
                            f"got {config['method']}")
        config.update(budget="train_to_budget(focused, scope='local', geometric schedule after 2 epochs, "
                             "budget at 1/3 of epochs)",
                      min_channels=BUDGET_MIN_CHANNELS)
    config.update(target_flops=target, prune_every=every, receded_below=below)
    if config["dataset"] != "digits" and config["data_dir"] is None:
        raise UserError(f"--dataset {config['dataset']} needs --data-dir (the folder holding "
                        f"{CIFAR_FILES[config['dataset']][0]})")
    return config


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
        return load_checkpoint(os.path.join(out, "last.pt"))
    except CheckpointError as exc:
        raise UserError(f"cannot resume: {exc}") from exc


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

    # Every rank seeds alike, so models start identical (DDP also broadcasts rank 0's).
    torch.manual_seed(config["seed"])
    if dist_ctx is None:
        device = resolve_device(config["device"])
    else:
        with user_errors(RuntimeError):
            device = D.setup(dist_ctx, config["device"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_dataset(config["dataset"], config["data_dir"], config["val_fraction"], config["seed"], device,
                              download=args.download, image_size=config["image_size"])
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    config.update({"num_classes": splits.num_classes, "in_channels": splits.in_channels,
                   "image_size_used": splits.image_size, "resolved_device": str(device), "versions": versions(),
                   "params": count_params(model), "flops": count_flops(model, example),
                   "train_size": len(splits.train), "val_size": len(splits.val), "test_size": len(splits.test)})
    if dist_ctx is not None:
        # Per-process batch: the global batch is world_size * batch_size.
        config["world_size"] = dist_ctx.world_size
        config["elastic_run_id"] = os.environ.get("TORCHELASTIC_RUN_ID")
        model = convert_sync_batchnorm(model)
    if config["target_flops"] is not None:
        # Bad budgets (unreachable with min_channels) are refused before anything is written.
        with user_errors(ValueError):
            check_budget(model, config["target_flops"], example, threshold=config["receded_below"],
                         min_channels=BUDGET_MIN_CHANNELS)
    created = False
    if is_main:
        with user_errors(OutputDirError):
            created = rundir.claim(out, "train", mode)
        write_run_json(out, "config.json", config)
    common = dict(epochs=config["epochs"], resume_from=resume_from, progress=is_main and not args.no_progress,
                  description=f"train {config['method']}", dist_ctx=dist_ctx, **fit_settings(config))
    try:
        if config["target_flops"] is not None:
            best = train_to_budget(model, splits, out, target_flops=config["target_flops"], example_inputs=example,
                                   strength=config["strength"], shift=config["shift"],
                                   normalize="layer" if config["penalty"] == "layer" else None,
                                   prune_every=config["prune_every"], threshold=config["receded_below"],
                                   min_channels=BUDGET_MIN_CHANNELS, **common)
        else:
            regularizer = make_regularizer(model, config["method"], config["strength"], config["shift"],
                                           config["penalty"] or "layer")
            best = fit(model, splits, out, regularizer=regularizer, **common)
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
        summary.update(budget_summary(build_model(config, splits.num_classes, splits.in_channels), best["model"],
                                      example, config["target_flops"]))
    if not is_main:
        return summary
    write_run_json(out, "summary.json", summary)
    if config["target_flops"] is not None:
        _budget_plot(out)
    print(f"{config['method']}: best epoch {best['epoch']} val {best['val_accuracy']:.4f} "
          f"test {best['test_accuracy']:.4f} -> {out}")
    return summary
