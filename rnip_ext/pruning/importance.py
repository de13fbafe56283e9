"""Channel importance scores of BatchNorm layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import BoundedBatchNorm2d
from .graph import find_channel_groups

__all__ = ["bn_scores", "channel_importance", "group_scores"]


def bn_scores(bn: nn.Module) -> Tensor:
    """Scores of one BatchNorm's channels: ``sigmoid(weight)`` for ``BoundedBatchNorm2d``,
    ``|weight|`` for a plain BatchNorm (network slimming), all ones without a scale (float32, CPU)."""
    if isinstance(bn, BoundedBatchNorm2d):
        return bn.importance.float().cpu()
    if getattr(bn, "weight", None) is None:
        return torch.ones(bn.num_features)
    return bn.weight.detach().abs().float().cpu()


def group_scores(model: nn.Module, groups) -> dict[str, Tensor]:
    """Per channel group (see :func:`rnip_ext.pruning.find_channel_groups`), the scores the
    pruning plan ranks channels by: the minimum over the group's coupled BatchNorms of
    :func:`bn_scores` (a channel is only as important as its least important coupled copy)."""
    modules = dict(model.named_modules())
    return {g.name: torch.stack([bn_scores(modules[n]) for n in g.bns]).amin(0) for g in groups}


def channel_importance(model: nn.Module, example_inputs=None) -> dict[str, Tensor]:
    """Per prunable BatchNorm (qualified name as in ``model.named_modules()``), its channel scores.

    Prunable means the layer's channels can be removed physically (see
    :func:`rnip_ext.pruning.find_channel_groups`); scores are ``sigmoid(weight)`` for
    ``BoundedBatchNorm2d`` and ``|weight|`` for ``nn.BatchNorm2d``.
    """
    modules = dict(model.named_modules())
    return {name: bn_scores(modules[name]) for g in find_channel_groups(model, example_inputs) for name in g.bns}
