"""Saving and loading pruned models without pickle.

A pruned model differs from its architecture only in layer widths, so a checkpoint is one
``torch.save`` file holding two plain objects, both readable with ``torch.load(weights_only=True)``:

* ``"architecture"``: a JSON string with the width of every conv, linear and BatchNorm layer
  (``{"modules": {name: {"type": ..., "in": ..., "out": ..., "groups": ..., "bias": ...}}}``) and,
  for models built by :mod:`rnip_ext.models`, the builder and its arguments;
* ``"state_dict"``: the model's tensors.

:func:`load` rebuilds the architecture (from the builder, or from a ``model`` you pass), narrows
each layer to the stored width and loads the tensors.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..nn import BoundedBatchNorm2d

__all__ = ["save", "load", "architecture", "architecture_json", "restore"]

FORMAT = "rnip_ext.pruned/1"


def architecture(model: nn.Module) -> dict:
    """The JSON-able description :func:`save` stores: every layer's widths, plus the builder."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            layers[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels,
                            "groups": m.groups, "bias": m.bias is not None}
        elif isinstance(m, nn.Linear):
            layers[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
        elif isinstance(m, (BoundedBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            layers[name] = {"type": type(m).__name__, "features": m.num_features}
    return {"format": FORMAT, "builder": getattr(model, "rnip_builder", None), "modules": layers}


def architecture_json(model: nn.Module) -> str:
    """:func:`architecture` as the JSON string checkpoints store (sorted keys)."""
    return json.dumps(architecture(model), sort_keys=True)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (pruned or not) to ``path``: its architecture as JSON and its state_dict.

    Written to a temporary file first and renamed, so an interrupted save never leaves a
    truncated checkpoint where a good one was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    payload = {"architecture": architecture_json(model), "state_dict": model.state_dict()}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


# A run trained under torchrun holds SyncBatchNorm variants; widths carry over to the plain layer.
_SYNC = {"SyncBoundedBatchNorm2d": "BoundedBatchNorm2d", "SyncBatchNorm": "BatchNorm2d"}


def _base_type(name: str) -> str:
    return _SYNC.get(name, name)


def _narrow(model: nn.Module, layers: dict) -> None:
    """Resize every described layer of ``model`` in place to the stored widths (values follow from load)."""
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        if name not in modules:
            raise ValueError(f"checkpoint describes a layer '{name}' that the model does not have")
        m = modules[name]
        if _base_type(type(m).__name__) != _base_type(spec["type"]) and not (
            spec["type"] == "Conv2d" and isinstance(m, nn.Conv2d)
        ):
            raise ValueError(f"checkpoint layer '{name}' is a {spec['type']}, the model's is {type(m).__name__}")
        factory = {"device": m.weight.device if getattr(m, "weight", None) is not None else None}
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = spec["in"], spec["out"], spec["groups"]
            shape = (spec["out"], spec["in"] // spec["groups"], *m.kernel_size)
            m.weight = nn.Parameter(torch.empty(shape, dtype=m.weight.dtype, **factory))
            m.bias = nn.Parameter(torch.empty(spec["out"], dtype=m.weight.dtype, **factory)) if spec["bias"] else None
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = spec["in"], spec["out"]
            m.weight = nn.Parameter(torch.empty(spec["out"], spec["in"], dtype=m.weight.dtype, **factory))
            m.bias = nn.Parameter(torch.empty(spec["out"], dtype=m.weight.dtype, **factory)) if spec["bias"] else None
        else:
            m.num_features = spec["features"]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, attr, None)
                if t is None:
                    continue
                new = torch.empty(spec["features"], dtype=t.dtype, device=t.device)
                if isinstance(t, nn.Parameter):
                    setattr(m, attr, nn.Parameter(new, requires_grad=t.requires_grad))
                else:
                    setattr(m, attr, new)


def _check_fixed_widths(model: nn.Module, layers: dict) -> None:
    """Refuse a ``model`` that differs from the checkpoint's in widths pruning never changes.

    Pruning only narrows, and only the channels between a conv and its BatchNorm and readers:
    no stored width may exceed the model's, a linear layer's outputs (the classes) never change,
    and neither do the input channels of the first convolution (the image channels).
    """
    modules = dict(model.named_modules())
    first_conv = next((n for n, m in modules.items() if isinstance(m, nn.Conv2d)), None)
    problems = []
    for name, spec in layers.items():
        m = modules.get(name)
        if isinstance(m, nn.Linear) and spec.get("type") == "Linear":
            if spec["out"] != m.out_features:
                problems.append(f"'{name}' has {spec['out']} outputs in the checkpoint, {m.out_features} in the model")
            if spec["in"] > m.in_features:
                problems.append(f"'{name}' has {spec['in']} inputs in the checkpoint, {m.in_features} in the model")
        elif isinstance(m, nn.Conv2d) and spec.get("type") == "Conv2d":
            if name == first_conv and spec["in"] != m.in_channels:
                problems.append(f"'{name}' reads {spec['in']} input channels in the checkpoint, "
                                f"{m.in_channels} in the model")
            for key, have in (("in", m.in_channels), ("out", m.out_channels)):
                if spec[key] > have:
                    problems.append(f"'{name}' has {spec[key]} {key}put channels in the checkpoint, {have} in the model")
        elif m is not None and "features" in spec and spec["features"] > getattr(m, "num_features", spec["features"]):
            problems.append(f"'{name}' has {spec['features']} channels in the checkpoint, {m.num_features} in the model")
    if problems:
        raise ValueError("the checkpoint was not pruned from this model (pruning never widens a layer, nor changes "
                         "the classes or the input channels): " + "; ".join(problems))


def load(path: str | os.PathLike, model: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """Read a checkpoint written by :func:`save` (with ``weights_only=True``; no pickle).

    Without ``model`` the architecture is rebuilt from the stored builder (models from
    :mod:`rnip_ext.models`); otherwise pass a fresh instance of the unpruned architecture, which
    is narrowed in place to the stored widths, filled and returned. A ``model`` whose widths
    pruning cannot have produced the stored ones from (other classes, other input channels, a
    narrower layer) raises ``ValueError``.

    The model is returned in **eval mode**, whatever mode it was saved in: loading is for
    inference or evaluation, and the running statistics are then used (call ``.train()`` to
    fine-tune).
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        arch = json.loads(payload["architecture"])
        state = payload["state_dict"]
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)} is not a checkpoint written by rnip_ext.pruning.save ({exc})") from exc
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        found = arch.get("format") if isinstance(arch, dict) else type(arch).__name__
        raise ValueError(f"{os.fspath(path)} has format {found!r}, expected {FORMAT!r}")
    if model is None:
        builder = arch.get("builder")
        if not builder:
            raise ValueError(
                "this checkpoint's model was not built by rnip_ext.models: pass model=<a fresh instance of "
                "the unpruned architecture> to load it; to ship a model that loads without its Python class "
                "(or without rnip_ext), write it with rnip_ext.pruning.export(model, path, example_inputs) and "
                "read it with torch.export.load(path).module()"
            )
        from .. import models

        name = builder.get("name") if isinstance(builder, dict) else None
        if name not in models.__all__ or not callable(getattr(models, name, None)) or not isinstance(
            builder.get("kwargs"), dict
        ):
            raise ValueError(f"{os.fspath(path)} names an unknown model builder {name!r} (not in rnip_ext.models)")
        model = getattr(models, name)(**builder["kwargs"])
    else:
        _check_fixed_widths(model, arch["modules"])
    _narrow(model, arch["modules"])
    model.load_state_dict(state)
    return model.eval()


def restore(model: nn.Module, state_dict: dict, architecture: str | dict | None = None) -> nn.Module:
    """Load ``state_dict`` into ``model``, first narrowing it to ``architecture`` when given.

    ``architecture`` is what :func:`architecture_json` (or :func:`architecture`) recorded for the
    model the state came from -- a training checkpoint of a run that pruned while training holds
    it next to the weights. ``model`` is a fresh instance of the unpruned architecture (checked as
    in :func:`load`, ``ValueError`` when pruning cannot have produced the stored widths from it)
    and is narrowed in place with the same code :func:`load` uses. Without ``architecture`` (older
    checkpoints) this is ``model.load_state_dict(state_dict)``. Returns ``model``; its
    train/eval mode is left as it was.
    """
    if architecture is not None:
        arch = json.loads(architecture) if isinstance(architecture, str) else architecture
        if not isinstance(arch, dict) or arch.get("format") != FORMAT or "modules" not in arch:
            raise ValueError(f"not an architecture recorded by rnip_ext.pruning (format {FORMAT!r})")
        _check_fixed_widths(model, arch["modules"])
        _narrow(model, arch["modules"])
    model.load_state_dict(state_dict)
    return model
