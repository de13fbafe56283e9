"""Choosing the channels to keep: a :class:`PruningPlan` for a given pruning ratio."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .flops import costs_from_graph, count_params
from .folding import fold_report
from .graph import ChannelGroup, analyse
from .importance import bn_scores

__all__ = ["PruningPlan", "plan", "module_slices"]

SCOPES = ("global", "local")
FOLDS = ("approximate", "refuse")


@dataclass
class PruningPlan:
    """What :func:`rnip_ext.pruning.apply` will remove, and what it will cost.

    Attributes:
        keep: ``{BatchNorm qualified name: sorted int64 tensor of kept channels}`` for every
            BatchNorm that loses channels (coupled BatchNorms listed with identical indices).
        groups: every prunable channel group (see :func:`find_channel_groups`).
        group_keep: kept channels per group name (all groups, pruned or not).
        scores: the group scores the choice was made on (``min`` over coupled BatchNorms).
        params, flops: ``(before, after)`` parameter and multiply-accumulate counts, the latter
            for ``example_inputs``.
        ratio: the requested fraction of prunable channels to remove; ``achieved_ratio`` what
            the plan removes after ``min_channels``.
        threshold: the highest score removed (``None`` when nothing is).
        inexact_folds: consumers into which removed channels' constant outputs are folded only
            approximately (a kxk zero-padded convolution sees the constant only away from the
            border). Empty when every fold is exact or there is nothing to fold.
    """

    keep: dict[str, Tensor]
    groups: list[ChannelGroup]
    group_keep: dict[str, Tensor]
    scores: dict[str, Tensor]
    params: tuple[int, int]
    flops: tuple[int, int]
    ratio: float
    achieved_ratio: float
    scope: str
    min_channels: int
    threshold: float | None
    fold: str
    inexact_folds: list[str] = field(default_factory=list)
    signature: dict[str, tuple] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [
            f"PruningPlan: scope={self.scope}, ratio={self.ratio:g} requested, "
            f"{self.achieved_ratio:.4f} achieved, min_channels={self.min_channels}"
            + (f", threshold={self.threshold:.4g}" if self.threshold is not None else ""),
            f"{'layer':<40} {'channels':>15} {'kept':>7}",
        ]
        for g in self.groups:
            kept = len(self.group_keep[g.name])
            label = g.name + (f" (+{len(g.bns) - 1} coupled)" if len(g.bns) > 1 else "")
            lines.append(f"{label:<40} {g.channels:>6} -> {kept:<6} {kept / g.channels:>6.1%}")
        p0, p1 = self.params
        f0, f1 = self.flops
        lines.append(f"parameters: {p0:,} -> {p1:,} ({1 - p1 / max(p0, 1):.1%} fewer)")
        lines.append(f"FLOPs (MACs): {f0:,} -> {f1:,} ({1 - f1 / max(f0, 1):.1%} fewer)")
        if self.inexact_folds:
            lines.append("approximate folds (kxk zero-padded convs): " + ", ".join(self.inexact_folds))
        return "\n".join(lines)


def _check_args(ratio, scope, min_channels, fold) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")


def _check_min_channels(groups: list[ChannelGroup], min_channels: int, ratio: float) -> None:
    """``min_channels`` against the layers' widths. Larger than some layers: those keep all their
    channels (a ``UserWarning`` naming them; the rest are still pruned). At least every layer's
    width while removal is asked for (``ratio > 0``, or ``ratio=None`` with a budget): nothing could
    be removed, so a ``ValueError`` instead of a silent 0%."""
    if (ratio is None or ratio > 0) and all(g.channels <= min_channels for g in groups):
        widest = max(g.channels for g in groups)
        raise ValueError(f"min_channels={min_channels} is at least the width of every prunable layer (the widest "
                         f"has {widest} channels): nothing can be removed; lower min_channels")
    small = [f"{g.name} ({g.channels})" for g in groups if g.channels < min_channels]
    if small:
        warnings.warn(f"min_channels={min_channels} exceeds the width of {', '.join(small)}: "
                      "they keep all their channels", UserWarning, stacklevel=3)


def _select(scores: list[Tensor], ratio: float, scope: str, min_channels: int) -> list[Tensor]:
    """Boolean keep-masks: drop the lowest-scored channels, ties broken by position (stable)."""
    masks = [torch.ones(len(s), dtype=torch.bool) for s in scores]
    if scope == "global":
        flat = torch.cat(scores)
        n_remove = math.floor(ratio * len(flat) + 1e-9)
        removed = torch.argsort(flat, stable=True)[:n_remove]
        offsets = torch.tensor([0] + [len(s) for s in scores]).cumsum(0)
        for mask, start, stop in zip(masks, offsets[:-1], offsets[1:]):
            local = removed[(removed >= start) & (removed < stop)] - start
            mask[local] = False
    else:
        for mask, s in zip(masks, scores):
            mask[torch.argsort(s, stable=True)[: math.floor(ratio * len(s) + 1e-9)]] = False
    for mask, s in zip(masks, scores):
        short = min(min_channels, len(s)) - int(mask.sum())
        if short > 0:  # give back the best of the removed channels
            removed = (~mask).nonzero().flatten()
            best = removed[torch.argsort(s[removed], descending=True, stable=True)[:short]]
            mask[best] = True
    return masks


def _expand(index: Tensor, block: int) -> Tensor:
    """Channel indices -> the feature indices of their ``block``-sized blocks after a flatten."""
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block)).flatten()


def module_slices(groups: list[ChannelGroup], group_keep: dict[str, Tensor]) -> dict[str, list]:
    """``{module name: [out_index or None, in_index or None]}`` for every module the plan slices."""
    slices: dict[str, list] = {}

    def put(name: str, dim: int, index: Tensor) -> None:
        entry = slices.setdefault(name, [None, None])
        entry[dim] = index

    for g in groups:
        keep = group_keep[g.name]
        if len(keep) == g.channels:
            continue
        put(g.producer, 0, keep)
        for name in g.bns + g.depthwise:
            put(name, 0, keep)
        for c in g.consumers:
            put(c.name, 1, _expand(keep, c.block))
    return slices


def _signature(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, tuple]:
    modules = dict(model.named_modules())
    names = {n for g in groups for n in [g.producer, *g.bns, *g.depthwise, *(c.name for c in g.consumers)]}
    sig = {}
    for name in sorted(names):
        m = modules[name]
        shape = tuple(m.weight.shape) if getattr(m, "weight", None) is not None else (m.num_features,)
        sig[name] = (type(m).__name__, shape)
    return sig


def _params_after(model: nn.Module, slices: dict[str, list], new_biases: list[str]) -> int:
    modules = dict(model.named_modules())
    added = 0
    for name in new_biases:  # sized by the consumer's outputs, themselves possibly pruned
        out_idx = slices.get(name, [None, None])[0]
        added += modules[name].weight.shape[0] if out_idx is None else len(out_idx)
    removed = 0
    for name, (out_idx, in_idx) in slices.items():
        m = modules[name]
        for p in m.parameters(recurse=False):
            shape = list(p.shape)
            if out_idx is not None:
                shape[0] = len(out_idx)
            if in_idx is not None and p.dim() > 1:
                shape[1] = len(in_idx)
            removed += p.numel() - math.prod(shape)
    return count_params(model) - removed + added


def _flops_after(model: nn.Module, costs: dict, slices: dict[str, list]) -> int:
    modules = dict(model.named_modules())
    total = 0
    for name, cost in costs.items():
        out_f, in_g = cost.out_features, cost.in_per_group
        if name in slices:
            out_idx, in_idx = slices[name]
            m = modules[name]
            depthwise = isinstance(m, nn.Conv2d) and m.groups > 1
            if out_idx is not None:
                out_f = len(out_idx)
            if in_idx is not None and not depthwise:
                in_g = len(in_idx)
        total += cost.positions * out_f * in_g * cost.kernel
    return total


@torch.no_grad()
def plan(
    model: nn.Module,
    ratio: float,
    scope: str = "global",
    min_channels: int = 3,
    *,
    example_inputs,
    fold: str = "approximate",
) -> PruningPlan:
    """Plan a one-shot channel pruning of ``model`` at ``ratio`` (fraction of prunable channels removed).

    Scores are ``sigmoid(weight)`` for bounded BatchNorms and ``|weight|`` for plain ones (a
    group of coupled BatchNorms scores each channel by the minimum over them). ``scope="global"``
    removes the ``floor(ratio * total)`` lowest-scored channels over all prunable layers (the
    paper's global quantile threshold; ties broken by position, so equal scores are handled),
    ``scope="local"`` the same fraction in each layer; then every layer gets back its best
    removed channels until it keeps ``min(min_channels, channels)``.

    ``example_inputs`` (a tensor or tuple of tensors, e.g. ``torch.randn(1, 3, 32, 32)``) sets the
    input size the FLOPs are counted for. A removed channel still outputs a constant (its shift,
    through the activation); :func:`apply` folds that into the next layer's bias, exactly for
    linear layers, 1x1 and unpadded convolutions, approximately for kxk zero-padded ones:
    ``fold="refuse"`` raises instead of planning such a fold.
    """
    _check_args(ratio, scope, min_channels, fold)
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("example_inputs is required to count FLOPs: pass e.g. torch.randn(1, 3, 32, 32)")
    # One traced forward gives both the channel groups and every layer's cost.
    groups, gm = analyse(model, example_inputs)
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no prunable BatchNorm2d (a BatchNorm between a conv and the "
            "convs/linear layers reading it, with no residual addition or concatenation in between)"
        )
    _check_min_channels(groups, min_channels, ratio)
    modules = dict(model.named_modules())
    scores = {
        g.name: torch.stack([bn_scores(modules[n]) for n in g.bns]).amin(0) for g in groups
    }
    masks = _select([scores[g.name] for g in groups], float(ratio), scope, min_channels)
    group_keep = {g.name: m.nonzero().flatten().to(torch.int64) for g, m in zip(groups, masks)}
    keep = {n: group_keep[g.name] for g in groups for n in g.bns if len(group_keep[g.name]) < g.channels}

    removed_scores = torch.cat([scores[g.name][~m] for g, m in zip(groups, masks)])
    total = sum(g.channels for g in groups)
    inexact, new_biases = fold_report(model, groups, group_keep)
    if inexact and fold == "refuse":
        raise ValueError(
            "removing these channels needs an approximate fold of their constant output into "
            f"kxk zero-padded convolutions ({', '.join(inexact)}); pass fold='approximate' to "
            "accept it"
        )
    slices = module_slices(groups, group_keep)
    costs = costs_from_graph(gm)
    return PruningPlan(
        keep=keep,
        groups=groups,
        group_keep=group_keep,
        scores=scores,
        params=(count_params(model), _params_after(model, slices, new_biases)),
        flops=(sum(c.macs for c in costs.values()), _flops_after(model, costs, slices)),
        ratio=float(ratio),
        achieved_ratio=len(removed_scores) / total,
        scope=scope,
        min_channels=min_channels,
        threshold=removed_scores.max().item() if len(removed_scores) else None,
        fold=fold,
        inexact_folds=inexact,
        signature=_signature(model, groups),
    )
