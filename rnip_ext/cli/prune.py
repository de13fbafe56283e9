"""``rnip prune``: one-shot prune a trained run, fine-tune without the regulariser, report."""

from __future__ import annotations

import argparse
import os

import torch

from .. import pruning
from ..data import load_dataset
from ..training import evaluate
from .runs import CheckpointError, load_checkpoint, read_json, write_json
from .train import build_model, fit, resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train`")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable channels to remove, in [0, 1)")
    p.add_argument("--scope", choices=("global", "local"), default="global")
    p.add_argument("--min-channels", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=160)
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default: the run's, reset)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--out", required=True, help="directory for the pruned run")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict:
    if not 0.0 <= args.ratio < 1.0:
        raise SystemExit(f"error: --ratio must be in [0, 1), got {args.ratio}")
    if args.finetune_epochs < 0:
        raise SystemExit("error: --finetune-epochs must be >= 0")
    try:
        config = read_json(os.path.join(args.run_dir, "config.json"))
        state = load_checkpoint(os.path.join(args.run_dir, "best.pt"))
    except (FileNotFoundError, CheckpointError) as exc:
        raise SystemExit(f"error: {args.run_dir} is not a finished `rnip train` run ({exc})") from exc
    if os.path.exists(os.path.join(args.out, "summary.json")):
        raise SystemExit(f"error: {args.out} already holds a pruned run; choose another --out")
    os.makedirs(args.out, exist_ok=True)
    device = resolve_device(args.device or config["device"])
    torch.manual_seed(config["seed"])
    splits = load_dataset(config["dataset"], config["data_dir"], config["val_fraction"], config["seed"], device,
                          image_size=config["image_size"])
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    model.load_state_dict(state["model"])
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    before = evaluate(model, splits.test)
    plan = pruning.plan(model, args.ratio, args.scope, args.min_channels, example_inputs=example)
    print(plan)
    small = pruning.apply(model, plan)
    pruned_acc = evaluate(small, splits.test)
    ft_config = dict(config, lr=args.lr or config["lr"], device=args.device or config["device"], compile=False)
    write_json(os.path.join(args.out, "config.json"), dict(ft_config, source_run=os.path.abspath(args.run_dir),
                                                          ratio=args.ratio, scope=args.scope,
                                                          min_channels=args.min_channels,
                                                          finetune_epochs=args.finetune_epochs))
    best = {"test_accuracy": pruned_acc, "val_accuracy": evaluate(small, splits.val), "epoch": 0}
    if args.finetune_epochs > 0:
        # Fine-tuning: the paper's schedule again from the run's lr, without the regulariser.
        best = fit(small, splits, ft_config, args.out, epochs=args.finetune_epochs, regularizer=None, device=device,
                   resume_from=None, progress=not args.no_progress, description="fine-tune")
        small.load_state_dict(load_checkpoint(os.path.join(args.out, "best.pt"))["model"])
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
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"{config['method']} pruned {args.ratio:.0%} ({args.scope}): test accuracy {before:.4f} -> "
          f"{pruned_acc:.4f} pruned -> {best['test_accuracy']:.4f} fine-tuned; params {plan.params[0]:,} -> "
          f"{plan.params[1]:,}; FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,}")
    return summary
