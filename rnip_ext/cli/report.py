"""``rnip report``: the paper-style table across runs, and the plots.

Argument parsing only: the report is :func:`rnip_ext.app.report.report` on a :class:`~rnip_ext.app.spec.ReportSpec`.
"""

from __future__ import annotations

import argparse

from ..app.report import report
from ..app.spec import ReportSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories from `rnip train` and `rnip prune`")
    p.add_argument("--out", default="report",
                   help="directory for report.md, report.json and the plots: new, empty or an earlier report's "
                        "(which is replaced)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace any earlier rnip output in --out (only files rnip wrote are deleted)")


def run(args: argparse.Namespace) -> dict[str, str]:
    return report(ReportSpec.from_args(args))
