"""``rnip prune``: one-shot prune a trained run, fine-tune without the regulariser, report.

Argument parsing and run-directory rules only; pruning and measuring is
:func:`rnip_ext.pipeline.prune_and_measure`, fine-tuning :func:`rnip_ext.training.fit`.
"""

from __future__ import annotations

import argparse
import os

import torch

from .. import pruning, rundir
from ..callbacks import run_callbacks
from ..pipeline import build_model, load_splits, prune_and_measure, prune_summary
from ..rundir import OutputDirError
from ..training import NonFiniteLossError, fit
from .errors import Interrupted, UserError, user_errors
from .runs import CheckpointError, load_checkpoint, read_json
from .train import (add_threads_argument, apply_threads, check_number, fit_settings, read_resume, resolve_device,
                    write_run_json)

# Settings that must match to resume an interrupted fine-tuning (the plan is recomputed from them).
RESUME_KEYS = ("source_run", "ratio", "target_flops", "target_params", "scope", "min_channels", "finetune_epochs", "lr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train`")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of prunable channels to remove, in [0, 1) (default 0.5 when no target is given)")
    budget.add_argument("--target-flops", type=float, default=None,
                        help="keep at most this fraction of the FLOPs (MACs), in (0, 1]")
    budget.add_argument("--target-params", type=float, default=None,
                        help="keep at most this fraction of the parameters, in (0, 1]")
    p.add_argument("--scope", choices=("global", "local"), default="global",
                   help="global: one threshold over all layers (the paper's); local: the same fraction per layer")
    p.add_argument("--min-channels", type=int, default=3, help="channels every layer keeps at least, >= 1")
    p.add_argument("--finetune-epochs", type=int, default=160, help="fine-tuning epochs (0: none)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr, > 0 (default: the run's, reset)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="default: the run's")
    p.add_argument("--out", required=True,
                   help="directory for the pruned run: must be new, empty, or this run being resumed (required)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, deleting only the files an earlier rnip run wrote there")
    p.add_argument("--workers", type=int, default=None,
                   help="imagefolder runs: data-loading worker processes (default min(4, CPUs))")
    add_threads_argument(p, "auto")
    p.add_argument("--no-progress", action="store_true", help="print nothing per epoch")


def validate(args: argparse.Namespace) -> None:
    """Every argument checked before anything is read or written; the default budget is ratio 0.5."""
    for name in ("ratio", "target_flops", "target_params"):  # callers building a Namespace may omit some
        setattr(args, name, getattr(args, name, None))
    if args.ratio is None and args.target_flops is None and args.target_params is None:
        args.ratio = 0.5
    if args.ratio is not None:
        check_number("ratio", args.ratio, low=0, high=1)
    for name in ("target-flops", "target-params"):
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            check_number(name, value, low=0, low_open=True, high=1, high_open=False)
    check_number("min-channels", args.min_channels, low=1)
    check_number("finetune-epochs", args.finetune_epochs, low=0)
    if args.lr is not None:
        check_number("lr", args.lr, low=0, low_open=True)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")


def _describe(args: argparse.Namespace, plan) -> str:
    if args.target_flops is not None:
        return f"to {plan.achieved_flops:.1%} of the FLOPs (target {args.target_flops:g})"
    if args.target_params is not None:
        return f"to {plan.achieved_params:.1%} of the parameters (target {args.target_params:g})"
    return f"{args.ratio:.0%} of channels"


def run(args: argparse.Namespace) -> dict:
    validate(args)
    try:
        config = read_json(os.path.join(args.run_dir, "config.json"))
        state = load_checkpoint(os.path.join(args.run_dir, "best.pt"))
    except (FileNotFoundError, CheckpointError) as exc:
        raise UserError(f"{args.run_dir} is not a finished `rnip train` run ({exc})") from exc
    if not isinstance(config, dict) or not {"arch", "method", "dataset", "seed"} <= set(config):
        raise UserError(f"{args.run_dir}/config.json is not an `rnip train` run's config")
    resume = getattr(args, "resume", False)
    with user_errors(OutputDirError):
        rundir.refuse_overlap(args.out, [args.run_dir])
        mode = rundir.check(args.out, "prune", resume=resume, overwrite=getattr(args, "overwrite", False),
                            hint="pass --resume to continue its fine-tuning, --overwrite to start over, "
                                 "or choose another --out")
    device = resolve_device(args.device or config["device"])
    apply_threads(getattr(args, "threads", "auto"))
    workers = getattr(args, "workers", None)
    if workers is not None:
        check_number("workers", workers, low=0)
    else:
        workers = min(4, os.cpu_count() or 1) if config["dataset"] == "imagefolder" else 0
    torch.manual_seed(config["seed"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_splits(config, device)
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    with user_errors(RuntimeError, ValueError, prefix=f"{args.run_dir}/best.pt does not fit the run's model: "):
        # A run that pruned while training stores its architecture: the fresh model is narrowed first.
        pruning.restore(model, state["model"], state.get("architecture"))
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    # A rough speed figure next to the FLOPs, on the run's device: FLOPs alone overstate speed-ups.
    with user_errors(ValueError):
        outcome = prune_and_measure(model, splits, example, ratio=args.ratio, target_flops=args.target_flops,
                                    target_params=args.target_params, scope=args.scope,
                                    min_channels=args.min_channels, speed_batch_size=min(config["batch_size"], 256))
    plan, small, speed = outcome.plan, outcome.small, (outcome.speed_before, outcome.speed_after)
    before, pruned_acc = outcome.acc_before, outcome.acc_pruned
    print(plan)
    print(f"measured speed (rough: median of {speed[0].timed_batches} batches of {speed[0].batch_size} after "
          f"{speed[0].warmup} warm-up, eval, {device}, {speed[0].threads} threads): {speed[0]} -> {speed[1]} "
          f"({speed[1].images_per_s / speed[0].images_per_s:.2f}x); FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,} "
          f"({plan.flops[0] / max(plan.flops[1], 1):.2f}x fewer)")
    ft_config = dict(config, lr=args.lr or config["lr"], device=args.device or config["device"], compile=False)
    ft_config.update(source_run=os.path.abspath(args.run_dir), ratio=args.ratio, target_flops=args.target_flops,
                     target_params=args.target_params, scope=args.scope,
                     min_channels=args.min_channels, finetune_epochs=args.finetune_epochs)
    resume_from = read_resume(args.out, ft_config, RESUME_KEYS, "prune") if resume else None
    with user_errors(OutputDirError):
        created = rundir.claim(args.out, "prune", mode)
    write_run_json(args.out, "config.json", ft_config)
    best = {"test_accuracy": pruned_acc, "val_accuracy": outcome.val_pruned, "epoch": 0}
    if args.finetune_epochs > 0:
        # Fine-tuning: the paper's schedule again from the run's lr, without the regulariser.
        try:
            with user_errors(RuntimeError, prefix=f"cannot resume {args.out}: "):
                if resume_from is not None:  # widths differ if the source run changed since
                    small.load_state_dict(resume_from["model"])
            best = fit(small, splits, epochs=args.finetune_epochs, resume_from=resume_from,
                       callbacks=run_callbacks(args.out, splits, num_workers=workers), num_workers=workers,
                       progress=not args.no_progress, description="fine-tune", **fit_settings(ft_config))
        except KeyboardInterrupt:
            saved = os.path.isfile(os.path.join(args.out, "last.pt"))
            raise Interrupted(args.out, saved, rundir.release(args.out, created)) from None
        except NonFiniteLossError as exc:
            rundir.release(args.out, created)
            raise UserError(str(exc)) from exc
        small.load_state_dict(load_checkpoint(os.path.join(args.out, "best.pt"))["model"])
    rundir.record(args.out, "pruned.pt")
    pruning.save(small, os.path.join(args.out, "pruned.pt"))
    summary = prune_summary(outcome, best, config=config, ratio=args.ratio, scope=args.scope,
                            target_flops=args.target_flops, target_params=args.target_params)
    write_run_json(args.out, "summary.json", summary)
    print(f"{config['method']} pruned {_describe(args, plan)} ({args.scope}): test accuracy {before:.4f} -> "
          f"{pruned_acc:.4f} pruned -> {best['test_accuracy']:.4f} fine-tuned; params {plan.params[0]:,} -> "
          f"{plan.params[1]:,}; FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,}")
    return summary
