"""``rnip prune``: one-shot prune a trained run, fine-tune without the regulariser, report.

Argument parsing only: the run is :func:`rnip_ext.app.prune.prune` on a :class:`~rnip_ext.app.spec.PruneSpec`.
"""

from __future__ import annotations

import argparse

from ..app.prune import prune
from ..app.spec import PruneSpec
from ..pruning.latency_plan import LATENCY_RULES
from ._options import add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train`")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of prunable channels to remove, in [0, 1) (default 0.5 when no target is given)")
    budget.add_argument("--target-flops", type=float, default=None,
                        help="keep at most this fraction of the FLOPs (MACs), in (0, 1]")
    budget.add_argument("--target-params", type=float, default=None,
                        help="keep at most this fraction of the parameters, in (0, 1]")
    budget.add_argument("--target-latency", type=float, default=None,
                        help="at most this fraction of the unpruned network's latency, in (0, 1], measured on the "
                             "run's device at batch 1 (a latency table is measured first)")
    p.add_argument("--latency-table", default=None, metavar="PATH",
                   help="with --target-latency: a latency table saved by an earlier prune (or LatencyTable.save) "
                        "to plan with; when PATH does not exist the table is measured and saved there")
    p.add_argument("--latency-rule", choices=LATENCY_RULES, default=None,
                   help="with --target-latency: knapsack (default: the most importance per second) or threshold "
                        "(the paper's global score order, the threshold set by the latency; better when the "
                        "importances have not receded, see docs/latency.md)")
    p.add_argument("--round-to", type=int, default=None,
                   help="every pruned layer keeps a multiple of this many channels, or all (default: no rounding)")
    p.add_argument("--residual-streams", action="store_true",
                   help="also prune the residual streams, each as one coupled channel group (the paper keeps "
                        "them whole; see docs/pruning.md)")
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


def run(args: argparse.Namespace) -> dict:
    return prune(PruneSpec.from_args(args))
