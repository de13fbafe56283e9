"""``rnip demo``: the README's main job on the embedded default dataset (no download).

Argument parsing only; the demo is :func:`rnip_ext.demo.run_demo` (several seeds, every method
pruned to the same FLOPs targets, accuracy before and after fine-tuning, the budget-aware
receding run per target, training compute, mean +- sd).
"""

from __future__ import annotations

import argparse

from .. import demo as demo_lib
from ..plots import require_matplotlib
from ..rundir import OutputDirError
from ..training import NonFiniteLossError
from .errors import UserError, user_errors
from .train import add_threads_argument, check_number, parse_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="rnip-demo",
                   help="directory for the runs, the report and the plots: new, empty or an earlier demo's "
                        "(which is replaced)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0 .. N-1; rows are mean +- sd")
    p.add_argument("--epochs", type=int, default=demo_lib.DEMO_EPOCHS, help="training epochs per method and seed (the budget-aware rni-budget runs are left out when too few "
                        "for their schedule, e.g. 1-3)")
    p.add_argument("--finetune-epochs", type=int, default=demo_lib.DEMO_FINETUNE_EPOCHS,
                   help="fine-tuning epochs per pruned model (0: none)")
    p.add_argument("--target-flops", type=float, nargs="+", default=list(demo_lib.DEMO_TARGETS),
                   help="fractions of the FLOPs (MACs) every method is pruned to, each in (0, 1]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    add_threads_argument(p, "1")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="print nothing per stage")
    p.add_argument("--overwrite", action="store_true",
                   help="replace any earlier rnip output in --out (only files rnip wrote are deleted)")


def run(args: argparse.Namespace) -> dict:
    check_number("seeds", args.seeds, low=1)
    check_number("epochs", args.epochs, low=1)
    check_number("finetune-epochs", args.finetune_epochs, low=0)
    threads = parse_threads(args.threads)
    for t in args.target_flops:
        check_number("target-flops", t, low=0, low_open=True, high=1, high_open=False)
    if len({round(t * 100) for t in args.target_flops}) != len(args.target_flops):
        raise UserError(f"--target-flops must differ by at least 0.01, got {args.target_flops}")
    if not args.no_plots:
        try:
            require_matplotlib()
        except ImportError as exc:
            raise UserError(f"{exc}, or pass --no-plots") from exc
    with user_errors(OutputDirError, ValueError, NonFiniteLossError, ImportError):
        report = demo_lib.run_demo(args.out, seeds=args.seeds, targets=args.target_flops, epochs=args.epochs,
                                   finetune_epochs=args.finetune_epochs, device=args.device,
                                   progress=not args.no_progress, plots=not args.no_plots, overwrite=args.overwrite,
                                   threads=threads)
    print(report["table"])
    m = report["machine"]
    print(f"\n{len(report['settings']['seeds'])} seed(s), {report['wall_s']:.0f} s on {m['cpu']} "
          f"({m['torch_threads']} torch threads{', ' + m['cuda'] if m['cuda'] else ''}); full report: "
          f"{args.out}/report.json, run logs: {args.out}/demo_log.txt")
    for path in report.get("plots", {}).values():
        print(f"wrote {path}")
    return report
