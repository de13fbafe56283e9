"""``rnip report``: the paper-style table across runs, and the plots (:func:`rnip_ext.report.make_report`)."""

from __future__ import annotations

import argparse

from .. import report as report_lib
from ..plots import require_matplotlib
from ..rundir import OutputDirError
from .errors import UserError, user_errors


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories from `rnip train` and `rnip prune`")
    p.add_argument("--out", default="report",
                   help="directory for report.md, report.json and the plots: new, empty or an earlier report's "
                        "(which is replaced)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace any earlier rnip output in --out (only files rnip wrote are deleted)")


def run(args: argparse.Namespace) -> dict[str, str]:
    if not args.no_plots:
        try:
            require_matplotlib()
        except ImportError as exc:
            raise UserError(f"{exc}, or pass --no-plots") from exc
    with user_errors(FileNotFoundError, report_lib.RunReadError, OutputDirError):
        return report_lib.make_report(args.runs, args.out, plots=not args.no_plots,
                                      overwrite=getattr(args, "overwrite", False))
