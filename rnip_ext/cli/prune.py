"""``rnip prune``: one-shot prune a trained run, fine-tune without the regulariser, report."""

from __future__ import annotations

import argparse
import os

import torch

from .. import pruning
from ..benchmarking import measure_throughput
from ..data import load_dataset
from ..training import evaluate
from .runs import CheckpointError, load_checkpoint, read_json, write_json
from .train import build_model, fit, resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train`")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of prunable channels to remove, in [0, 1) (default 0.5 when no target is given)")
    budget.add_argument("--target-flops", type=float, default=None,
                        help="keep at most this fraction of the FLOPs (MACs), in (0, 1]")
    budget.add_argument("--target-params", type=float, default=None,
                        help="keep at most this fraction of the parameters, in (0, 1]")
    p.add_argument("--scope", choices=("global", "local"), default="global")
    p.add_argument("--min-channels", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=160)
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default: the run's, reset)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--out", required=True, help="directory for the pruned run")
    p.add_argument("--no-progress", action="store_true")


def _budget(args: argparse.Namespace) -> None:
    """Fill in the default ratio (0.5) when no budget is given; check the one that is."""
    for name in ("ratio", "target_flops", "target_params"):  # callers building a Namespace may omit some
        setattr(args, name, getattr(args, name, None))
    if args.ratio is None and args.target_flops is None and args.target_params is None:
        args.ratio = 0.5
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise SystemExit(f"error: --ratio must be in [0, 1), got {args.ratio}")
    for flag, value in (("--target-flops", args.target_flops), ("--target-params", args.target_params)):
        if value is not None and not 0.0 < value <= 1.0:
            raise SystemExit(f"error: {flag} must be a fraction in (0, 1], got {value}")


def _describe(args: argparse.Namespace, plan) -> str:
    if args.target_flops is not None:
        return f"to {plan.achieved_flops:.1%} of the FLOPs (target {args.target_flops:g})"
    if args.target_params is not None:
        return f"to {plan.achieved_params:.1%} of the parameters (target {args.target_params:g})"
    return f"{args.ratio:.0%} of channels"


def run(args: argparse.Namespace) -> dict:
    _budget(args)
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
    try:
        plan = pruning.plan(model, args.ratio, args.scope, args.min_channels, example_inputs=example,
                            target_flops=args.target_flops, target_params=args.target_params)
    except ValueError as exc:  # e.g. a target that min_channels and the unprunable layers cannot reach
        raise SystemExit(f"error: {exc}") from exc
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
    write_json(os.path.join(args.out, "config.json"), dict(ft_config, source_run=os.path.abspath(args.run_dir),
                                                          ratio=args.ratio, target_flops=args.target_flops,
                                                          target_params=args.target_params, scope=args.scope,
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
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"{config['method']} pruned {_describe(args, plan)} ({args.scope}): test accuracy {before:.4f} -> "
          f"{pruned_acc:.4f} pruned -> {best['test_accuracy']:.4f} fine-tuned; params {plan.params[0]:,} -> "
          f"{plan.params[1]:,}; FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,}")
    return summary
