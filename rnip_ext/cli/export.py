"""``rnip export``: write a run's network as a file that loads without rnip_ext (torch.export or ONNX).

Argument parsing only: the export is :func:`rnip_ext.app.export.export` on an :class:`~rnip_ext.app.spec.ExportSpec`.
"""

from __future__ import annotations

import argparse

from .. import pruning
from ..app.export import export
from ..app.spec import ExportSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train` (best.pt) or `rnip prune` (pruned.pt)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.pt2 (never overwritten)")
    p.add_argument("--format", choices=pruning.deploy.FORMATS, default=None,
                   help="pt2 (torch.export, default) or onnx (extra `onnx`); default: onnx for an --out "
                        "ending in .onnx, else pt2")


def run(args: argparse.Namespace) -> dict:
    return export(ExportSpec.from_args(args))
