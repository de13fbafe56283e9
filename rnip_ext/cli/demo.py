"""``rnip demo``: the README's main job on the embedded default dataset (no download).

Trains the small VGG on scikit-learn's 8x8 digits (upsampled to 16x16) with the receding
regulariser (rni), network slimming (l1) and no regulariser (none), prunes each at 50% and 90%
(global threshold; none uses the same fraction per layer, the paper's "uniform" baseline),
fine-tunes briefly, prints the comparison table and writes the plots.
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

from .. import rundir
from ..rundir import OutputDirError
from . import prune as prune_cmd
from . import report as report_cmd
from . import train as train_cmd
from .errors import Interrupted, user_errors
from .train import check_number

# Far stronger than the paper's (1e-3, shift 3 over 160 CIFAR epochs): here ~500 steps must be
# enough to polarise the importances; shift 1 lets the regulariser reach channels near w = 0.
DEMO_STRENGTH = {"rni": (5e-2, 1.0), "l1": (1e-3, 0.0), "none": (0.0, 0.0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="rnip-demo",
                   help="directory for the runs, the report and the plots: new, empty or an earlier demo's "
                        "(which is replaced)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per method")
    p.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs per pruned model")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.9], help="pruning ratios, each in [0, 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="print nothing per epoch")
    p.add_argument("--overwrite", action="store_true",
                   help="replace any earlier rnip output in --out (only files rnip wrote are deleted)")


def run(args: argparse.Namespace) -> None:
    check_number("epochs", args.epochs, low=1)
    check_number("finetune-epochs", args.finetune_epochs, low=0)
    for ratio in args.ratios or []:
        check_number("ratios", ratio, low=0, high=1)
    # A previous demo's output is replaced; anything else is never deleted.
    with user_errors(OutputDirError):
        mode = rundir.check(args.out, "demo", overwrite=args.overwrite, replace_own=True)
        created = rundir.claim(args.out, "demo", mode)
    run_dirs = []
    try:
        for method, (strength, shift) in DEMO_STRENGTH.items():
            name = f"train-{method}"
            train_dir = os.path.join(args.out, name)
            rundir.record(args.out, name)
            train_cmd.run(SimpleNamespace(
                arch="vgg_small", dataset="digits", data_dir=None, download=False, method=method,
                strength=strength, shift=shift, epochs=args.epochs, lr=0.05, batch_size=32, weight_decay=1e-4,
                bn_lr_scale=10.0, val_fraction=0.1, seed=args.seed, device=args.device, amp="none",
                channels_last=False, compile=False, out=train_dir, resume=False, overwrite=False,
                no_progress=args.no_progress))
            run_dirs.append(train_dir)
            for ratio in args.ratios:
                name = f"prune-{method}-{int(round(ratio * 100))}"
                prune_dir = os.path.join(args.out, name)
                rundir.record(args.out, name)
                prune_cmd.run(SimpleNamespace(
                    run_dir=train_dir, ratio=ratio, scope="local" if method == "none" else "global",
                    min_channels=3, finetune_epochs=args.finetune_epochs, lr=None, device=None, out=prune_dir,
                    resume=False, overwrite=False, no_progress=args.no_progress))
                run_dirs.append(prune_dir)
    except Interrupted:
        # Nothing to resume: the next `rnip demo` replaces this output and starts again.
        raise KeyboardInterrupt from None
    finally:
        if not run_dirs:  # failed before any run finished: leave no empty --out behind
            rundir.release(args.out, created, keep=())
    report_cmd.write_report(report_cmd.collect(run_dirs), args.out, plots=not args.no_plots)
