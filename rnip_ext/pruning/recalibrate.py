"""Re-estimating BatchNorm running statistics after channels left (no weight changes)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import BoundedBatchNorm2d

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable) -> nn.Module:
    """Recompute every BatchNorm's running statistics of ``model`` from ``batches``, in place.

    Each removed channel carried little signal (importance below the threshold), but the next
    BatchNorm's running mean and variance were measured with all of them present; after many
    have left, those statistics are off and eval accuracy drops although the function in
    training mode barely moved. This resets every BatchNorm (bounded or plain) that tracks
    running statistics and re-estimates them as the plain average over ``batches``
    (``momentum=None``: running mean = mean of the batch means, running variance = mean of the
    unbiased batch variances). Only the BatchNorms run in training mode; every other module
    (dropout, for example) runs in eval mode. No parameter changes and no gradient is
    computed; each module's mode and momentum are restored afterwards.

    ``batches``: tensors, or tuples/lists whose first element is the input (``(x, y)`` pairs),
    on the model's device; at least one. Returns ``model``.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:  # checked before anything is reset
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    norms = [m for m in model.modules()
             if isinstance(m, (BoundedBatchNorm2d, _BatchNorm)) and m.track_running_stats]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in itertools.chain([first], batches):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, Tensor):
                raise TypeError(f"batches must yield tensors or (input, ...) tuples, got {type(x).__name__}")
            model(x)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return model
