"""``rnip export``: write a run's network as a file that loads without rnip_ext (torch.export or ONNX)."""

from __future__ import annotations

import argparse
import os

import torch

from .. import pruning
from ..data import DATASETS
from .errors import UserError
from .runs import CheckpointError, load_checkpoint, read_json
from .train import build_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a directory written by `rnip train` (best.pt) or `rnip prune` (pruned.pt)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.pt2 (never overwritten)")
    p.add_argument("--format", choices=pruning.deploy.FORMATS, default=None,
                   help="pt2 (torch.export, default) or onnx (extra `onnx`); default: onnx for an --out "
                        "ending in .onnx, else pt2")


def _fail(message: str) -> None:
    """A user mistake: one ``error:`` line and exit status 2 (see :mod:`rnip_ext.cli.errors`), nothing written."""
    raise UserError(message)


def _load_model(run_dir: str, config: dict) -> torch.nn.Module:
    """The run's network: the fine-tuned pruned one of a prune run, else the best of a training run."""
    pruned = os.path.join(run_dir, "pruned.pt")
    if os.path.exists(pruned):
        return pruning.load(pruned)
    model = build_model(config, DATASETS[config["dataset"]][0], config["in_channels"])
    state = load_checkpoint(os.path.join(run_dir, "best.pt"))
    pruning.restore(model, state["model"], state.get("architecture"))  # narrowed first if pruned in training
    return model


def run(args: argparse.Namespace) -> dict:
    fmt = args.format or ("onnx" if args.out.lower().endswith(".onnx") else "pt2")
    if os.path.exists(args.out):
        _fail(f"{args.out} already exists; choose another --out (nothing was written)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        _fail(f"the folder of {args.out} does not exist")
    try:
        config = read_json(os.path.join(args.run_dir, "config.json"))
        model = _load_model(args.run_dir, config)
        size = config.get("image_size_used") or config.get("image_size") or DATASETS[config["dataset"]][3]
        example = torch.zeros(1, config["in_channels"], size, size)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError) as exc:
        _fail(f"{args.run_dir} is not a finished `rnip train` or `rnip prune` run ({type(exc).__name__}: {exc})")
    try:
        pruning.export(model, args.out, example, format=fmt, overwrite=False)
    except ImportError as exc:
        _fail(str(exc))
    except FileExistsError:
        _fail(f"{args.out} was created by something else while exporting; it was left as it is")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({fmt}, {params:,} parameters, input (N, {config['in_channels']}, {size}, {size}) "
          f"normalised as in training, any batch size N); load it with "
          + ("torch.export.load(path).module()" if fmt == "pt2" else "onnxruntime.InferenceSession(path)"))
    return {"out": args.out, "format": fmt, "params": params}
