"""``rnip export`` as a library call: :func:`export` writes a run's network as a file that loads without rnip_ext."""

from __future__ import annotations

import os

import torch

from .. import pruning
from ..data import DATASETS
from ..rundir import CheckpointError, load_checkpoint, read_json
from .errors import UserError
from .runs import build_model
from .spec import ExportSpec

__all__ = ["export"]


def _fail(message: str) -> None:
    """A user mistake: one ``error:`` line and exit status 2 (see :mod:`rnip_ext.app.errors`), nothing written."""
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


def export(spec: ExportSpec) -> dict:
    """Write the network of ``spec.run_dir`` to ``spec.out`` (never overwritten); returns ``out``, ``format``, ``params``."""
    fmt = spec.format
    if os.path.exists(spec.out):
        _fail(f"{spec.out} already exists; choose another --out (nothing was written)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(spec.out))):
        _fail(f"the folder of {spec.out} does not exist")
    try:
        config = read_json(os.path.join(spec.run_dir, "config.json"))
        model = _load_model(spec.run_dir, config)
        size = config.get("image_size_used") or config.get("image_size") or DATASETS[config["dataset"]][3]
        example = torch.zeros(1, config["in_channels"], size, size)
    except (FileNotFoundError, KeyError, ValueError, CheckpointError) as exc:
        _fail(f"{spec.run_dir} is not a finished `rnip train` or `rnip prune` run ({type(exc).__name__}: {exc})")
    try:
        pruning.export(model, spec.out, example, format=fmt, overwrite=False)
    except ImportError as exc:
        _fail(str(exc))
    except FileExistsError:
        _fail(f"{spec.out} was created by something else while exporting; it was left as it is")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {spec.out} ({fmt}, {params:,} parameters, input (N, {config['in_channels']}, {size}, {size}) "
          f"normalised as in training, any batch size N); load it with "
          + ("torch.export.load(path).module()" if fmt == "pt2" else "onnxruntime.InferenceSession(path)"))
    return {"out": spec.out, "format": fmt, "params": params}
