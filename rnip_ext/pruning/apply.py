"""Physically removing channels: a new, smaller module from a model and its :class:`PruningPlan`."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..ops import channel_gather_many
from .folding import fold_delta
from .plan import PruningPlan, _signature, module_slices, plan

__all__ = ["apply", "prune"]

_SLICED_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _check_plan_fits(model: nn.Module, pruning_plan: PruningPlan) -> None:
    if not isinstance(pruning_plan, PruningPlan):
        raise TypeError(f"expected a PruningPlan, got {type(pruning_plan).__name__}")
    modules = dict(model.named_modules())
    missing = [n for n in pruning_plan.signature if n not in modules]
    if missing:
        raise ValueError(
            f"this plan was made for a different model: it names modules the model lacks ({', '.join(missing[:5])})"
        )
    actual = _signature(model, pruning_plan.groups)
    for name, expected in pruning_plan.signature.items():
        if actual[name] != expected:
            raise ValueError(
                f"this plan was made for a different model: module '{name}' is {actual[name][0]} of "
                f"shape {actual[name][1]}, the plan expects {expected[0]} of shape {expected[1]}"
            )


def _removed(channels: int, keep: Tensor) -> Tensor:
    mask = torch.ones(channels, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


@torch.no_grad()
def apply(model: nn.Module, pruning_plan: PruningPlan) -> nn.Module:
    """A new, physically smaller copy of ``model`` with the channels ``pruning_plan`` removes gone.

    ``model`` is left untouched. Every sliced tensor (conv and linear weights and biases,
    BatchNorm parameters and running statistics) is gathered in one
    :func:`rnip_ext.ops.channel_gather_many` call; the rest is shared-nothing deep-copied.
    ``num_batches_tracked``, ``requires_grad``, training mode, dtypes and devices are carried over.
    The constant output of removed channels is folded into the consumers' biases (see
    :func:`rnip_ext.pruning.plan`).

    The result has new parameter objects: optimisers (and regularisers) built for ``model`` must
    be rebuilt for it.
    """
    _check_plan_fits(model, pruning_plan)
    modules = dict(model.named_modules())
    slices = module_slices(pruning_plan.groups, pruning_plan.group_keep)

    deltas: dict[str, Tensor] = {}
    for g in pruning_plan.groups:
        removed = _removed(g.channels, pruning_plan.group_keep[g.name])
        if len(removed) == 0:
            continue
        for c in g.consumers:
            delta = fold_delta(model, c, removed, modules)
            if delta is not None:
                deltas[c.name] = delta if c.name not in deltas else deltas[c.name] + delta

    originals, out_indices, in_indices = [], [], []
    for name, (out_idx, in_idx) in slices.items():
        m = modules[name]
        for attr in _SLICED_TENSORS:
            t = getattr(m, attr, None)
            if not isinstance(t, Tensor):
                continue
            o = out_idx
            i = in_idx if t.dim() > 1 else None
            if o is None and i is None:
                continue  # e.g. a consumer's bias: indexed by its own, unchanged outputs
            originals.append(t)
            out_indices.append(None if o is None else o.to(t.device))
            in_indices.append(None if i is None else i.to(t.device))
    gathered = channel_gather_many([t.detach() for t in originals], out_indices, in_indices)

    memo: dict[int, object] = {}
    for old, new in zip(originals, gathered):
        memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    pruned = copy.deepcopy(model, memo)

    new_modules = dict(pruned.named_modules())
    for name, (out_idx, in_idx) in slices.items():
        m = new_modules[name]
        if isinstance(m, nn.Conv2d):
            if out_idx is not None:
                m.out_channels = len(out_idx)
            if m.groups > 1:  # depthwise: channels in == out == groups
                m.in_channels = m.groups = len(out_idx)
            elif in_idx is not None:
                m.in_channels = len(in_idx)
        elif isinstance(m, nn.Linear):
            if out_idx is not None:
                m.out_features = len(out_idx)
            if in_idx is not None:
                m.in_features = len(in_idx)
        else:
            m.num_features = len(out_idx)

    for name, delta in deltas.items():
        m = new_modules[name]
        out_idx = slices.get(name, [None, None])[0]
        if out_idx is not None:  # the consumer also lost outputs to another group
            delta = delta[out_idx.to(delta.device)]
        if m.bias is None:
            m.bias = nn.Parameter(delta.to(m.weight.dtype), requires_grad=m.weight.requires_grad)
        else:
            m.bias.add_(delta.to(m.bias.dtype))
    return pruned


def prune(
    model: nn.Module,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 3,
    *,
    example_inputs,
    target_flops: float | None = None,
    target_params: float | None = None,
    fold: str = "approximate",
) -> nn.Module:
    """Plan and apply in one call: ``apply(model, plan(model, ratio, ...))`` (see both); exactly
    one of ``ratio``, ``target_flops`` (fraction of FLOPs kept) and ``target_params``."""
    return apply(model, plan(model, ratio, scope, min_channels, example_inputs=example_inputs,
                             target_flops=target_flops, target_params=target_params, fold=fold))
