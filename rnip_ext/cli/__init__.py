"""The ``rnip`` command (also ``python -m rnip_ext``): train, prune, export, report, demo."""

from __future__ import annotations

import argparse

from . import demo, export, prune, report, train

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnip", description="Receding Neuron Importances: train, prune, report.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in (
        ("train", train, "train a network with the paper's recipe"),
        ("prune", prune, "one-shot prune a trained run and fine-tune it"),
        ("export", export, "write a run's network as a torch.export (.pt2) or ONNX file that loads without rnip_ext"),
        ("report", report, "table and plots across runs"),
        ("demo", demo, "train, prune and compare on the embedded digits dataset"),
    ):
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rnip`` console script."""
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0
