"""``rnip demo``: the README's main job on the embedded default dataset (no download).

Argument parsing only: the demo is :func:`rnip_ext.app.demo.demo` on a :class:`~rnip_ext.app.spec.DemoSpec`
(several seeds, every method pruned to the same FLOPs targets, accuracy before and after fine-tuning,
the budget-aware receding run per target, training compute, mean +- sd).
"""

from __future__ import annotations

import argparse

from ..app.demo import DEMO_TARGETS, demo
from ..app.spec import DemoSpec
from ._options import add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="rnip-demo",
                   help="directory for the runs, the report and the plots: new, empty or an earlier demo's "
                        "(which is replaced)")
    p.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0 .. N-1; rows are mean +- sd")
    p.add_argument("--epochs", type=int, default=DemoSpec.epochs, help="training epochs per method and seed (the budget-aware rni-budget runs are left out when too few "
                        "for their schedule, e.g. 1-3)")
    p.add_argument("--finetune-epochs", type=int, default=DemoSpec.finetune_epochs,
                   help="fine-tuning epochs per pruned model (0: none)")
    p.add_argument("--target-flops", type=float, nargs="+", default=list(DEMO_TARGETS),
                   help="fractions of the FLOPs (MACs) every method is pruned to, each in (0, 1]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    add_threads_argument(p, "1")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="print nothing per stage")
    p.add_argument("--overwrite", action="store_true",
                   help="replace any earlier rnip output in --out (only files rnip wrote are deleted)")


def run(args: argparse.Namespace) -> dict:
    return demo(DemoSpec.from_args(args))
