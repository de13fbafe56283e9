"""Channel importance scores of BatchNorm layers: what "removable" means.

Two scores (``score=``):

``"relative"`` (the default everywhere)
    In a *renormalised* channel group (every layer reading the group is a convolution whose
    output goes straight into a BatchNorm, see :class:`~rnip_ext.pruning.ChannelGroup`), a
    channel is scored relative to the strongest channel of its own layer::

        bounded BN:  r_c = sigmoid(w_c) / max_j sigmoid(w_j)   (computed as exp(logsigmoid(w_c) - max_j logsigmoid(w_j)))
        plain BN:    r_c = |gamma_c| / max_j |gamma_j|         (0 where every gamma is 0)

    Why: the next BatchNorm divides by the standard deviation of the convolution's output, so
    multiplying every scale of the layer by the same ``a > 0`` leaves the network's function
    unchanged (exactly for positively homogeneous paths -- ReLU, LeakyReLU, max/avg pooling,
    dropout -- up to the renormalising BatchNorm's ``eps``, which acts as ``eps / a**2``; the
    running statistics of that BatchNorm must be re-estimated). The receding regulariser can
    lower such a layer's common scale for free, so ``sigmoid(w)`` alone does not say whether a
    channel is removable; its share of the layer's strongest channel does, and it is invariant
    to that common scale. The ratio to the maximum (rather than the share of the layer's total)
    keeps the score independent of the layer's width, so one global threshold means the same
    in a 16- and a 512-channel layer: ``r_c < 0.01`` is "this channel carries under 1% of the
    signal of the layer's strongest channel". Everywhere else (groups feeding a linear layer, a
    pooling head, or a conv that is not renormalised) the common scale reaches the output, and
    the score is the paper's absolute one below. Coupled BatchNorms (a depthwise group) are
    scored each by this rule and the group takes the minimum.

``"paper"``
    The paper's absolute score: ``sigmoid(w)`` for bounded BatchNorms, ``|gamma|`` for plain
    ones (network slimming), 1 for layers without a scale.

The two differ only in renormalised groups, and there only by one positive factor per layer
(``1 / max``): rankings inside a layer are identical, but a global ranking over layers changes.

Residual streams (``residual_streams=True``): the BatchNorms of a stream group are summed, not
chained, so a channel of the stream carries nothing only when it has receded in *every* one of
them. Its score is therefore the **maximum** over the group's BatchNorms (a chained group, through
a depthwise conv, takes the minimum: one receded copy silences the channel). With
``score="relative"`` in a renormalised stream group, each BatchNorm's score is divided by the
largest score over the *whole group* (not its own layer's): the common factor a renormalising
BatchNorm makes free is the stream's, shared by all summands, while one block's BatchNorm can
recede entirely (a block that learnt little) and must not look important relative to itself.

Layers with a shift (``bias=True`` bounded, every plain BatchNorm): the score measures the
varying part of the channel (its scale); a removed channel's constant output (its shift through
the activation) is folded into the next layer by :func:`rnip_ext.pruning.apply`, so the shift
does not make a channel less removable. The common-scale invariance then holds when the shifts
are scaled together with the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import BoundedBatchNorm2d
from .graph import find_channel_groups

__all__ = ["SCORES", "bn_scores", "channel_importance", "combine_scores", "group_bn_scores", "group_scores"]

SCORES = ("relative", "paper")


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def bn_scores(bn: nn.Module, score: str = "relative", *, renormalised: bool = False) -> Tensor:
    """Scores of one BatchNorm's channels (float32, CPU).

    ``score="paper"``, or any score when the layer is not ``renormalised``: ``sigmoid(weight)``
    for ``BoundedBatchNorm2d``, ``|weight|`` for a plain BatchNorm, all ones without a scale.
    ``score="relative"`` with ``renormalised=True``: that score divided by the layer's maximum
    (see the module docstring). ``renormalised`` is a property of the channel group (the graph),
    so a call with only the layer gets the paper's score.
    """
    _check_score(score)
    relative = score == "relative" and renormalised
    weight = getattr(bn, "weight", None)
    if weight is None:
        return torch.ones(bn.num_features)
    w = weight.detach().float().cpu()
    if isinstance(bn, BoundedBatchNorm2d):
        if not relative:
            return torch.sigmoid(w)
        log_s = F.logsigmoid(w)  # in log space: no 0/0 when every sigmoid underflows
        return torch.exp(log_s - log_s.max())
    scores = w.abs()
    if relative:
        top = scores.max()
        scores = scores / top if top > 0 else torch.zeros_like(scores)
    return scores


def _log_paper_scores(bn: nn.Module) -> Tensor:
    """``log`` of the paper's score: ``logsigmoid(w)`` (bounded), ``log|gamma|`` (plain; -inf at 0), 0 without a scale."""
    weight = getattr(bn, "weight", None)
    if weight is None:
        return torch.zeros(bn.num_features)
    w = weight.detach().float().cpu()
    return F.logsigmoid(w) if isinstance(bn, BoundedBatchNorm2d) else w.abs().log()


def group_bn_scores(modules: dict, group, score: str = "relative") -> list[Tensor]:
    """The scores of each BatchNorm of ``group`` (in ``group.bns`` order) as the group combines
    them (:func:`combine_scores`): :func:`bn_scores` in a plain group; in a residual stream group
    (and a selective kernel block's stacked paths, also summed) the paper's score, divided by the largest over the whole group where the group is
    renormalised and ``score="relative"`` (see the module docstring)."""
    _check_score(score)
    if not getattr(group, "summed", False):
        return [bn_scores(modules[n], score, renormalised=group.renormalised) for n in group.bns]
    if not (score == "relative" and group.renormalised):
        return [bn_scores(modules[n], "paper") for n in group.bns]
    logs = [_log_paper_scores(modules[n]) for n in group.bns]  # in log space: no 0/0 on underflow
    top = max(float(x.max()) for x in logs)
    if top == float("-inf"):  # every scale of the stream is 0
        return [torch.zeros_like(x) for x in logs]
    return [torch.exp(x - top) for x in logs]


def combine_scores(group, scores: list[Tensor]) -> Tensor:
    """One score per channel of ``group`` from its BatchNorms' (``group.bns`` order): the
    minimum for chained BatchNorms (a depthwise group: one receded copy silences the channel),
    the maximum in a residual stream and over a selective kernel block's stacked paths (summed
    BatchNorms, ``group.summed``: the channel is silent only when it has receded in every one)."""
    stacked = torch.stack(scores)
    return stacked.amax(0) if getattr(group, "summed", False) else stacked.amin(0)


def group_scores(model: nn.Module, groups, score: str = "relative") -> dict[str, Tensor]:
    """Per channel group (see :func:`rnip_ext.pruning.find_channel_groups`), the scores the
    pruning plan ranks channels by: the minimum over the group's coupled BatchNorms of
    :func:`bn_scores` (a channel is only as important as its least important coupled copy),
    each relative to its layer where the group is renormalised and ``score="relative"``; in a
    residual stream group the maximum over its BatchNorms, relative to the whole group's
    largest score where renormalised (:func:`group_bn_scores`, :func:`combine_scores`); in a
    group through a grouped convolution every channel of a block of ``unit`` channels gets the
    block's maximum (blocks are removed whole)."""
    _check_score(score)
    modules = dict(model.named_modules())
    result = {}
    for g in groups:
        s = combine_scores(g, group_bn_scores(modules, g, score))
        if g.unit > 1:  # a block of a grouped conv goes whole: it is as important as its best channel
            s = s.reshape(-1, g.unit).amax(1, keepdim=True).expand(-1, g.unit).reshape(-1)
        result[g.name] = s
    return result


def channel_importance(model: nn.Module, example_inputs=None, score: str = "relative", *,
                       residual_streams: bool = False) -> dict[str, Tensor]:
    """Per prunable BatchNorm (qualified name as in ``model.named_modules()``), its channel scores.

    Prunable means the layer's channels can be removed physically (see
    :func:`rnip_ext.pruning.find_channel_groups`). ``score="relative"`` (default): in a group
    whose readers are convolutions renormalised by a BatchNorm, ``sigmoid(w_c) / max_j
    sigmoid(w_j)`` (``|gamma_c| / max_j |gamma_j|`` for plain BatchNorms), elsewhere the paper's
    score; ``score="paper"``: ``sigmoid(weight)`` for ``BoundedBatchNorm2d`` and ``|weight|`` for
    ``nn.BatchNorm2d`` everywhere. The module docstring of :mod:`rnip_ext.pruning.importance`
    says why and when the two differ. This is the one definition plan, budgets, schedules and
    reports use. ``residual_streams=True``: the groups couple residual streams, whose
    BatchNorms are scored against the whole group (:func:`group_bn_scores`).
    """
    _check_score(score)
    modules = dict(model.named_modules())
    return {
        name: s
        for g in find_channel_groups(model, example_inputs, residual_streams=residual_streams)
        for name, s in zip(g.bns, group_bn_scores(modules, g, score))
    }
