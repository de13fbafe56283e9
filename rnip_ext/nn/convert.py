"""Swap the BatchNorm layers of an existing model for bounded ones."""

from __future__ import annotations

from torch import nn

from .bounded_batchnorm import BoundedBatchNorm2d

__all__ = ["convert_batchnorm"]


def _is_plain_batchnorm2d(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and not isinstance(module, BoundedBatchNorm2d)


def convert_batchnorm(model: nn.Module, *, bias: bool = False) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``model`` (recursively, in place) by a ``BoundedBatchNorm2d``.

    Each replacement comes from :meth:`BoundedBatchNorm2d.from_batchnorm`: same device, dtype and
    settings, running statistics and ``num_batches_tracked`` carried over, the shift kept when
    ``bias=True``, and the scale logit ``weight`` freshly drawn from ``N(0, 1)`` (the paper's
    initialisation; a plain ``gamma`` has no faithful bounded equivalent). Returns ``model``, or
    the new layer when ``model`` itself is a ``BatchNorm2d``. Optimisers built before the call
    still hold the old parameters: build them afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_batchnorm expects an nn.Module, got {type(model).__name__}")
    if _is_plain_batchnorm2d(model):
        return BoundedBatchNorm2d.from_batchnorm(model, bias=bias)
    for name, child in model.named_children():
        if _is_plain_batchnorm2d(child):
            setattr(model, name, BoundedBatchNorm2d.from_batchnorm(child, bias=bias))
        else:
            convert_batchnorm(child, bias=bias)
    return model
