"""Selective kernel blocks: parallel paths stacked, weighted per path and channel, and summed.

timm's ``SelectiveKernel`` (SKNet, ``skresnet18``/``skresnet34``) computes

    paths  p_m = act(bn_m(conv_m(x)))                       m = 0 .. M-1, each (B, C, H, W)
    s      = torch.stack([p_0, ..., p_{M-1}], dim=1)        (B, M, C, H, W)
    a      = softmax(view(fc_select(act(bn(fc_reduce(mean(s.sum(1)))))), (B, M, C, 1, 1)), dim=1)
    out    = torch.sum(s * a, dim=1)                        (B, C, H, W)

Channel ``c`` of every path is the same channel once summed, so the paths' BatchNorms form
**one** channel group: every path's conv loses output ``c`` (``ChannelGroup.producers``), every
path's BatchNorm loses ``c``, the attention's reducing conv and the layers reading the sum lose
input ``c`` (consumers), and ``fc_select`` loses outputs ``m * C + c`` for every path ``m``
(``ChannelGroup.selects``). The softmax runs over the paths, separately per channel, so the
weights of the kept channels do not change.

Scoring: the paths are summed, so a channel carries nothing only when it has receded in every
path's BatchNorm: the group is scored like a residual stream, by the maximum over its BatchNorms
(``ChannelGroup.summed``; :func:`rnip_ext.pruning.importance.combine_scores`).

Folding: a removed channel outputs its BatchNorm's shift through the activation in each path
(:mod:`rnip_ext.pruning.folding` evaluates the group's nodes on those constants, the stack
included). The attention's reducing conv reads ``mean(sum over paths)``: the summed constants,
folded exactly. The sum weighted by the softmax is not a constant (the weights vary with the
input), so a non-zero constant there is dropped and its consumer is listed in
``plan.inexact_folds``, as for a gate; with bounded BatchNorms without shift (the default) every
constant is 0 and the fold is exact.

What still blocks, named in the blockers: a stack whose listed tensors are not each a path
``conv (groups=1) -> BatchNorm -> elementwise ops`` of the group's width used only by the stack
(ResNeXt-style SK blocks with grouped path convs, whose BatchNorms chain to the group before
them), a stack along another dimension, anything on the stacked tensor other than elementwise
ops, a per-path channel weighting from one conv and the sum over the paths. A ``torch.split``
before the paths (``split_input=True``, as in skresnet18/34) is on their *input* side: it does
not concern this group but still blocks the BatchNorm whose output is split ("split").
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import ChannelGroup, _is_shape_query, _other_node_args, _shape, _target_name

__all__ = ["join_stack", "select_conv"]

SOFTMAX_TARGETS = {torch.softmax, F.softmax, "softmax"}
REDUCE_TARGETS = {torch.sum, torch.mean, "sum", "mean"}


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (shape queries such as ``x.shape`` aside)."""
    return [u for u in node.users if not _is_shape_query(u)]


def _stack_parts(stack: fx.Node) -> tuple[list, int] | None:
    """``(listed tensors, dim)`` of a ``torch.stack`` call, else None."""
    tensors = _arg(stack, 0, "tensors")
    dim = _arg(stack, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    return list(tensors), dim


def _path_bn(an, tensor, channels: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """The BatchNorm node a stacked ``tensor`` comes from through elementwise ops (each read by
    the next only), and those ops: ``(bn node, [ops])``; None unless it is a path
    ``conv (groups=1) -> BatchNorm`` of width ``channels``."""
    chain: list[fx.Node] = []
    node = tensor
    while isinstance(node, fx.Node):
        if len(_data_users(node)) != 1:
            return None
        kind = an.kind(node)
        if kind == "bn":
            produced = an.producer(node)
            if produced is None or produced[0] != "conv" or len(node.args) != 1 or node.kwargs:
                return None
            conv = an.modules[produced[1].target]
            if conv.out_channels != channels or an.modules[node.target].num_features != channels:
                return None
            return node, chain
        if kind != "pointwise" or not node.args or _other_node_args(node, node.args[0]):
            return None
        chain.append(node)
        node = node.args[0]
    return None


def _is_path_sum(node: fx.Node, stacked: fx.Node) -> bool:
    """``x.sum(1)``, ``torch.sum(x, dim=1)`` (or the mean) of the stacked ``(B, M, C, H, W)``
    tensor: back to ``(B, C, H, W)``, the paths summed channel by channel."""
    if node.op not in ("call_method", "call_function") or node.target not in REDUCE_TARGETS:
        return False
    if _arg(node, 0, "input") is not stacked or _other_node_args(node, stacked):
        return False
    dim = _arg(node, 1, "dim")
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if len(dims) != 1 or not isinstance(dims[0], int) or dims[0] % 5 != 1:
        return False
    if _arg(node, 2, "keepdim", False) or node.kwargs.get("dtype") is not None:
        return False
    before, after = _shape(stacked), _shape(node)
    return before is not None and after == before[:1] + before[2:]


def select_conv(an, gate: fx.Node, channels: int, paths: int) -> str | None:
    """The conv whose output, viewed as ``(B, paths, channels, ...)`` and through elementwise ops
    and a softmax over the paths, is ``gate``: the per-path channel weights of a selective kernel
    attention (``fc_select``, ``paths * channels`` outputs). None otherwise."""
    shape = _shape(gate)
    if shape is None or len(shape) != 5 or shape[1:3] != (paths, channels):
        return None
    node, stacked = gate, True
    while isinstance(node, fx.Node):
        if len(_data_users(node)) != 1:
            return None
        if not stacked and an.kind(node) == "conv":
            return node.target if an.modules[node.target].out_channels == paths * channels else None
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return None
        if stacked and node.target in SOFTMAX_TARGETS and node.op in ("call_function", "call_method"):
            # Over the paths only: each channel's weights are normalised on their own.
            dim = _arg(node, 1, "dim")
            if not isinstance(dim, int) or dim % 5 != 1 or _other_node_args(node, source):
                return None
        elif stacked and node.op == "call_method" and node.target in ("view", "reshape"):
            # (B, M*C, h, w) -> (B, M, C, h, w): output m*C + c is path m's weight of channel c.
            # The other arguments are sizes (ints, or shape arithmetic), never channel values.
            before = _shape(source)
            if before is None or len(before) != 4 or before[1] != paths * channels \
                    or (before[0], *before[2:]) != (shape[0], *shape[3:]):
                return None
            stacked = False
        elif an.kind(node) != "pointwise" or _other_node_args(node, source):
            return None
        node = source
    return None


def join_stack(an, stack: fx.Node, start: fx.Node, source: str, group: ChannelGroup, channels: int,
               path: list[fx.Node], seen: set) -> fx.Node | None:
    """The walk (``_Analysis.follow``) reached ``torch.stack`` from ``start``: join every other
    stacked path's BatchNorm and conv to ``group``, then walk the stacked tensor to the sum over
    the paths and on from there. The blocking node, or None."""
    parts = _stack_parts(stack)
    shape = _shape(stack)
    if parts is None or shape is None or len(shape) != 5 or parts[1] % 5 != 1 or shape[2] != channels \
            or len(parts[0]) < 2 or len(set(parts[0])) != len(parts[0]):
        an.notes[stack] = "stack (not of distinct 4-D paths along the channels' dim 1)"
        return stack
    tensors = parts[0]
    if group.depthwise:
        # Its BatchNorms would be both chained (scored by the minimum) and summed (the maximum).
        an.notes[stack] = "stack of paths after a depthwise/grouped convolution"
        return stack
    found = [_path_bn(an, t, channels) for t in tensors]
    # The walk came along one of the paths: its BatchNorm must be the group's already.
    if any(f is None for f in found) or found[tensors.index(start)][0].target not in group.bns:
        an.notes[stack] = ("stack of paths that are not each conv (groups=1) -> BatchNorm -> elementwise ops "
                           "(e.g. grouped path convs)")
        return stack
    for bn, chain in found:
        if bn.target in group.bns:
            continue
        group.bns.append(bn.target)
        group.producers.append(an.producer(bn)[1].target)
        group.stream.append(bn)
        seen.update((bn, *chain))
    seen.add(stack)
    group.stream.append(stack)
    return _follow_stacked(an, stack, source, group, channels, len(tensors), path + [stack], seen)


def _follow_stacked(an, node: fx.Node, source: str, group: ChannelGroup, channels: int, paths: int,
                    path: list[fx.Node], seen: set) -> fx.Node | None:
    """Walk forward on the stacked ``(B, M, C, H, W)`` tensor ``node``: elementwise ops and
    per-path channel weights (:func:`select_conv`) keep it stacked, a sum over the paths ends it
    (the plain walk goes on from there). The blocking node, or None."""
    if not node.users:
        return node
    for user in node.users:
        if user in seen or _is_shape_query(user):
            continue
        if _is_path_sum(user, node):
            seen.add(user)
            blocker = an.follow(user, source, group, channels, path + [user], False, seen)
        elif an.kind(user) == "pointwise" and not _other_node_args(user, node):
            seen.add(user)
            blocker = _follow_stacked(an, user, source, group, channels, paths, path + [user], seen)
        elif an.kind(user) == "mul" and not user.kwargs:
            others = [a for a in user.args if isinstance(a, fx.Node) and a is not node]
            conv = select_conv(an, others[0], channels, paths) if len(others) == 1 and len(user.args) == 2 else None
            if conv is None or conv in group.selects or _shape(user) != _shape(node):
                an.notes.setdefault(user, "multiplication of stacked paths by a tensor that is not a per-path "
                                          "channel weighting from one conv")
                return user
            user.meta["rnip_gate"] = True  # a varying weight: only a zero constant stays constant
            group.selects[conv] = paths
            seen.add(user)
            blocker = _follow_stacked(an, user, source, group, channels, paths, path + [user], seen)
        else:
            an.notes.setdefault(user, f"{_target_name(user)} of stacked paths (only elementwise ops, per-path channel "
                                      "weights and the sum over the paths are followed)")
            return user
        if blocker is not None:
            return blocker
    return None

