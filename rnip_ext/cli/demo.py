"""``rnip demo``: the README's main job on the embedded default dataset (no download).

Trains the small VGG on scikit-learn's 8x8 digits (upsampled to 16x16) with the receding
regulariser (rni), network slimming (l1) and no regulariser (none), prunes each at 50% and 90%
(global threshold; none uses the same fraction per layer, the paper's "uniform" baseline),
fine-tunes briefly, prints the comparison table and writes the plots. ``--target-flops``
compares the methods at equal FLOPs instead (each pruned to the same fraction of its FLOPs;
none with the smallest uniform per-layer ratio that reaches it).
"""

from __future__ import annotations

import argparse
import os
import shutil
from types import SimpleNamespace

from . import prune as prune_cmd
from . import report as report_cmd
from . import train as train_cmd

# Far stronger than the paper's (1e-3, shift 3 over 160 CIFAR epochs): here ~500 steps must be
# enough to polarise the importances; shift 1 lets the regulariser reach channels near w = 0.
MARKER = ".rnip-demo"
DEMO_STRENGTH = {"rni": (5e-2, 1.0), "l1": (1e-3, 0.0), "none": (0.0, 0.0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="rnip-demo", help="directory for the runs, the report and the plots")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--finetune-epochs", type=int, default=10)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratios", type=float, nargs="+", default=None,
                        help="fractions of channels to prune (default 0.5 0.9)")
    budget.add_argument("--target-flops", type=float, nargs="+", default=None,
                        help="compare at equal cost: fractions of the FLOPs to keep, e.g. 0.5 0.1")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (a previous demo's is replaced anyway)")


def run(args: argparse.Namespace) -> None:
    marker = os.path.join(args.out, MARKER)
    if os.path.exists(args.out):
        # A previous demo's output is replaced; anything else is never deleted without asking.
        if not (args.overwrite or os.path.isfile(marker)):
            raise SystemExit(f"error: {args.out} exists and is not a demo output; pass --overwrite or another --out")
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    with open(marker, "w") as f:
        f.write("written by `rnip demo`; the next `rnip demo` replaces this folder\n")
    run_dirs = []
    for method, (strength, shift) in DEMO_STRENGTH.items():
        train_dir = os.path.join(args.out, f"train-{method}")
        train_cmd.run(SimpleNamespace(
            arch="vgg_small", dataset="digits", data_dir=None, download=False, method=method, strength=strength,
            shift=shift, epochs=args.epochs, lr=0.05, batch_size=32, weight_decay=1e-4, bn_lr_scale=10.0,
            val_fraction=0.1, seed=args.seed, device=args.device, amp="none", channels_last=False, compile=False,
            out=train_dir, resume=False, no_progress=args.no_progress))
        run_dirs.append(train_dir)
        targets = getattr(args, "target_flops", None)
        budgets = ([(f"f{int(round(t * 100))}", None, t) for t in targets] if targets
                   else [(str(int(round(r * 100))), r, None) for r in (args.ratios or [0.5, 0.9])])
        for label, ratio, target_flops in budgets:
            prune_dir = os.path.join(args.out, f"prune-{method}-{label}")
            prune_cmd.run(SimpleNamespace(
                run_dir=train_dir, ratio=ratio, target_flops=target_flops, target_params=None,
                scope="local" if method == "none" else "global", min_channels=3,
                finetune_epochs=args.finetune_epochs, lr=None, device=None, out=prune_dir,
                no_progress=args.no_progress))
            run_dirs.append(prune_dir)
    report_cmd.write_report(report_cmd.collect(run_dirs), args.out, plots=not args.no_plots)
