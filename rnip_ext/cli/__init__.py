"""The ``rnip`` command (also ``python -m rnip_ext``): train, prune, export, report, demo.

Exit status: 0 on success, 2 with one ``error: ...`` line on stderr for any mistake the user can
fix (arguments, data, output directories, run files, a diverged loss), 130 after Ctrl-C (with
what was saved and the full command that continues the run).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from .. import __version__
from . import demo, export, prune, report, train
from ..app.errors import Interrupted, UserError

__all__ = ["main", "build_parser"]

COMMANDS = (
    ("train", train, "Train a network with the paper's recipe and checkpoint every epoch."),
    ("prune", prune, "Prune a trained run once, fine-tune it and report the result."),
    ("export", export, "Write a run's network as a .pt2 (torch.export) or ONNX file that loads without rnip_ext."),
    ("report", report, "Print the comparison table across runs and write the plots."),
    ("demo", demo, "Train, prune and compare three methods on the digits that ship with scikit-learn."),
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it is ``None`` (the help then says what applies)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``error:`` line (usage is one ``--help`` away)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The ``rnip`` argument parser: one subcommand per module in :data:`COMMANDS`."""
    parser = _Parser(prog="rnip", description="Receding Neuron Importances: train, prune, report.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"rnip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, description in COMMANDS:
        p = sub.add_parser(name, help=description[:-1].lower(), description=description,
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same one, plus ``--resume``."""
    # --overwrite would delete the run being resumed (and is refused together with --resume).
    args = [a for a in argv if a != "--overwrite"]
    args += [] if "--resume" in args else ["--resume"]
    return "rnip " + shlex.join(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rnip`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        args.handler(args)
    except UserError as exc:
        # One line, always: library messages that span lines keep their first (the gist).
        message = (str(exc).strip().splitlines() or ["unknown error"])[0]
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as exc:
        if exc.saved:
            print(f"\ninterrupted: the last finished epoch is saved in {exc.run_dir}; continue with: "
                  f"{resume_command(argv)}", file=sys.stderr)
        else:
            gone = f" ({exc.run_dir} removed)" if exc.removed else ""
            print(f"\ninterrupted before the first epoch finished: nothing was saved{gone}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
