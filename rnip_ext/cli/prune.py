"""``rnip prune``: one-shot prune a trained run, fine-tune without the regulariser, report."""

from __future__ import annotations

import argparse
import os

import torch

from .. import pruning, rundir
from ..data import load_dataset
from ..rundir import OutputDirError
from ..training import NonFiniteLossError, evaluate, fit
from .errors import Interrupted, UserError, user_errors
from .runs import CheckpointError, load_checkpoint, read_json
from .train import build_model, check_number, fit_settings, read_resume, resolve_device, write_run_json

# Settings that must match to resume an interrupted fine-tuning (the plan is recomputed from them).
RESUME_KEYS = ("source_run", "ratio", "target_flops", "target_params", "scope", "min_channels", "finetune_epochs",
               "lr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train`")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable channels to remove, in [0, 1)")
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
    """Every argument checked before anything is read or written."""
    if getattr(args, "ratio", None) is not None:
        check_number("ratio", args.ratio, low=0, high=1)
    check_number("min-channels", args.min_channels, low=1)
    check_number("finetune-epochs", args.finetune_epochs, low=0)
    if args.lr is not None:
        check_number("lr", args.lr, low=0, low_open=True)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")


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
        mode = rundir.check(args.out, "prune", resume=resume, overwrite=getattr(args, "overwrite", False),
                            hint="pass --resume to continue its fine-tuning, --overwrite to start over, "
                                 "or choose another --out")
    device = resolve_device(args.device or config["device"])
    torch.manual_seed(config["seed"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_dataset(config["dataset"], config["data_dir"], config["val_fraction"], config["seed"], device,
                              image_size=config["image_size"])
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    with user_errors(RuntimeError, prefix=f"{args.run_dir}/best.pt does not fit the run's model: "):
        model.load_state_dict(state["model"])
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    before = evaluate(model, splits.test)
    with user_errors(ValueError):
        plan = pruning.plan(model, args.ratio, args.scope, args.min_channels, example_inputs=example)
    print(plan)
    small = pruning.apply(model, plan)
    pruned_acc = evaluate(small, splits.test)
    ft_config = dict(config, lr=args.lr or config["lr"], device=args.device or config["device"], compile=False)
    ft_config.update(source_run=os.path.abspath(args.run_dir), ratio=args.ratio, scope=args.scope,
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
        "ratio": args.ratio, "achieved_ratio": plan.achieved_ratio, "scope": args.scope,
        "accuracy_before_pruning": before, "accuracy_after_pruning": pruned_acc,
        "test_accuracy": best["test_accuracy"], "val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
        "params": plan.params[1], "params_before": plan.params[0], "flops": plan.flops[1],
        "flops_before": plan.flops[0], "kept_channels": kept,
    }
    write_run_json(args.out, "summary.json", summary)
    print(f"{config['method']} pruned {args.ratio:.0%} ({args.scope}): test accuracy {before:.4f} -> "
          f"{pruned_acc:.4f} pruned -> {best['test_accuracy']:.4f} fine-tuned; params {plan.params[0]:,} -> "
          f"{plan.params[1]:,}; FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,}")
    return summary
