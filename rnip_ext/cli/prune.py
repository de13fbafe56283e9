"""``rnip prune``: one-shot prune a trained run, fine-tune without the regulariser, report."""

from __future__ import annotations

import argparse
import os

import torch

from .. import pruning, rundir
from ..benchmarking import measure_throughput
from ..data import load_dataset
from ..rundir import OutputDirError
from ..training import NonFiniteLossError, evaluate, fit
from .errors import Interrupted, UserError, user_errors
from .runs import CheckpointError, load_checkpoint, read_json
from .train import build_model, check_number, fit_settings, read_resume, resolve_device, write_run_json

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
    torch.manual_seed(config["seed"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_dataset(config["dataset"], config["data_dir"], config["val_fraction"], config["seed"], device,
                              image_size=config["image_size"])
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    with user_errors(RuntimeError, ValueError, prefix=f"{args.run_dir}/best.pt does not fit the run's model: "):
        # A run that pruned while training stores its architecture: the fresh model is narrowed first.
        pruning.restore(model, state["model"], state.get("architecture"))
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    before = evaluate(model, splits.test)
    with user_errors(ValueError):
        plan = pruning.plan(model, args.ratio, args.scope, args.min_channels, example_inputs=example,
                            target_flops=args.target_flops, target_params=args.target_params)
    print(plan)
    small = pruning.apply(model, plan)
    # A rough speed figure next to the FLOPs, on the run's device: FLOPs alone overstate speed-ups.
    speed_batch = torch.randn(min(config["batch_size"], 256), *example.shape[1:], device=device)
    speed = [measure_throughput(m, speed_batch, warmup=2, repeats=5) for m in (model, small)]
    print(f"measured speed (rough: median of {speed[0].timed_batches} batches of {speed[0].batch_size} after "
          f"{speed[0].warmup} warm-up, eval, {device}, {speed[0].threads} threads): {speed[0]} -> {speed[1]} "
          f"({speed[1].images_per_s / speed[0].images_per_s:.2f}x); FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,} "
          f"({plan.flops[0] / max(plan.flops[1], 1):.2f}x fewer)")
    pruned_acc = evaluate(small, splits.test)
    ft_config = dict(config, lr=args.lr or config["lr"], device=args.device or config["device"], compile=False)
    ft_config.update(source_run=os.path.abspath(args.run_dir), ratio=args.ratio, target_flops=args.target_flops,
                     target_params=args.target_params, scope=args.scope,
                     min_channels=args.min_channels, finetune_epochs=args.finetune_epochs)
    resume_from = read_resume(args.out, ft_config, RESUME_KEYS, "prune") if resume else None
    with user_errors(OutputDirError):
        created = rundir.claim(args.out, "prune", mode)
    write_run_json(args.out, "config.json", ft_config)
    best = {"test_accuracy": pruned_acc, "val_accuracy": evaluate(small, splits.val), "epoch": 0}
    if args.finetune_epochs > 0:
        # Fine-tuning: the paper's schedule again from the run's lr, without the regulariser.
        try:
            with user_errors(RuntimeError, prefix=f"cannot resume {args.out}: "):
                if resume_from is not None:  # widths differ if the source run changed since
                    small.load_state_dict(resume_from["model"])
            best = fit(small, splits, args.out, epochs=args.finetune_epochs, regularizer=None,
                       resume_from=resume_from, progress=not args.no_progress, description="fine-tune",
                       **fit_settings(ft_config))
        except KeyboardInterrupt:
            saved = os.path.isfile(os.path.join(args.out, "last.pt"))
            raise Interrupted(args.out, saved, rundir.release(args.out, created)) from None
        except NonFiniteLossError as exc:
            rundir.release(args.out, created)
            raise UserError(str(exc)) from exc
        small.load_state_dict(load_checkpoint(os.path.join(args.out, "best.pt"))["model"])
    rundir.record(args.out, "pruned.pt")
    pruning.save(small, os.path.join(args.out, "pruned.pt"))
    # A list, in graph order (JSON objects are written with sorted keys).
    kept = [[g.name, g.channels, len(plan.group_keep[g.name])] for g in plan.groups]
    summary = {
        "kind": "prune", "arch": config["arch"], "dataset": config["dataset"], "method": config["method"],
        # ``ratio`` is the channel ratio asked for, or the one a budget led to (tables sort by it).
        "ratio": args.ratio if args.ratio is not None else plan.achieved_ratio,
        "achieved_ratio": plan.achieved_ratio, "scope": args.scope,
        "target_flops": args.target_flops, "target_params": args.target_params,
        "achieved_flops": plan.achieved_flops, "achieved_params": plan.achieved_params,
        "images_per_s_before": speed[0].images_per_s, "images_per_s_after": speed[1].images_per_s,
        "speed_batch_size": speed[0].batch_size, "speed_device": str(device),
        "accuracy_before_pruning": before, "accuracy_after_pruning": pruned_acc,
        "test_accuracy": best["test_accuracy"], "val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
        "params": plan.params[1], "params_before": plan.params[0], "flops": plan.flops[1],
        "flops_before": plan.flops[0], "kept_channels": kept,
    }
    write_run_json(args.out, "summary.json", summary)
    print(f"{config['method']} pruned {_describe(args, plan)} ({args.scope}): test accuracy {before:.4f} -> "
          f"{pruned_acc:.4f} pruned -> {best['test_accuracy']:.4f} fine-tuned; params {plan.params[0]:,} -> "
          f"{plan.params[1]:,}; FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,}")
    return summary
