"""Folding the constant output of removed channels into the next layer's bias.

A removed channel whose scale is ~0 outputs its shift ``beta`` (0 for a bounded BatchNorm
without bias); after the pointwise ops on the way it is a constant ``v = f(beta)``. A consumer
computing ``W x + b`` then sees ``W[:, c] * v`` from that channel, which is moved into ``b``:

    conv:   b_o += v_c * sum_{kh,kw} W[o, c, kh, kw]       (exact unless zero padding)
    linear: b_o += v_c * sum_{j in block(c)} W[o, j]

Through a concatenation the consumer reads channel ``c`` as its input ``offset + c`` (see
:class:`~rnip_ext.pruning.graph.Consumer`); the concatenation itself leaves a constant as it is.

In a residual stream (``residual_streams=True``) a consumer reads a sum: ``v`` is then found by
running the stream's nodes on the constants, from the consumer's input back to the group's
BatchNorms (each outputs its own ``f(beta)``: its scale is what removal zeroes, so its input does
not matter). A sum adds its summands' constants, an activation after it acts on the sum (not on
each summand), pooling keeps a constant; the result is as exact as for a plain group (approximate
through a zero-padded kxk consumer, a zero-padding average pool, a gate).

The parallel paths of a selective kernel block (:mod:`rnip_ext.pruning.selective`) are folded
the same way: ``torch.stack`` stacks the paths' constants, a sum over the paths adds them (the
attention's reducing conv reads that sum: exact), and the per-path softmax weights act as a
gate (a non-zero constant is dropped: approximate).

Dropout and stochastic depth / drop path (timm's ``DropPath``, torchvision's ``StochasticDepth``)
leave a constant as in eval mode, where they are the identity: the fold is exact for the network
in eval mode. In training they scale each sample (drop path: by 0 or ``1/(1-p)``), so a removed
channel's non-zero constant would have been scaled with its sample, and the folded bias gives
every sample its mean instead. With bounded BatchNorms without shift (the default) every constant
is 0 and both modes are exact.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..nn.norm_act import is_norm_act
from .graph import (ADD_TARGETS, CAT_TARGETS, POINTWISE_MODULES, POOL_FUNCTIONS, POOL_MODULES, STACK_TARGETS,
                    ChannelGroup, Consumer, _is_shape_query, drop_path_modules, is_drop_path)

__all__ = ["Fold", "fold_report", "fold_delta", "constant_outputs", "group_folds"]

_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def _apply_node(node: fx.Node, value: Tensor, modules: dict) -> Tensor:
    """Run one pointwise node of the path on a ``(1, R, 1, 1)`` tensor of constants."""
    if is_drop_path(node, modules):
        return value  # stochastic depth / drop path: as in eval mode (see the module docstring)
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _DROPOUTS + POOL_MODULES + (nn.Flatten, nn.Identity)):
            return value  # identity on a constant (dropout as in eval mode)
        return m(value.clone())
    if node.op == "call_function":
        if node.target in POOL_FUNCTIONS or node.target is torch.flatten or node.target in CAT_TARGETS:
            return value  # a concatenation: the consumer's offset places the channels
        if node.target is operator.getitem:
            return value  # only a slice that keeps the whole tensor is on a path
        if node.target in (nn.functional.dropout, nn.functional.dropout2d):
            return value
        args = (value.clone(), *node.args[1:])
        return node.target(*args, **node.kwargs)
    if node.target in ("flatten", "view", "reshape", "contiguous"):
        return value
    return getattr(value.clone(), node.target)(*node.args[1:], **node.kwargs)


def _gated(path: list[fx.Node]) -> bool:
    return any(node.meta.get("rnip_gate") for node in path)


def _bn_constant(bn: nn.Module, removed: Tensor) -> Tensor:
    """What the removed channels of ``bn`` output once their scale is 0: ``beta`` (0 without a
    shift), through the activation of a norm-activation layer; shaped ``(1, R, 1, 1)``."""
    bias = getattr(bn, "bias", None)
    beta = bias.detach()[removed] if bias is not None else torch.zeros(len(removed), device=removed.device)
    value = beta.reshape(1, -1, 1, 1)
    if is_norm_act(bn):
        value = bn.act(value.clone())  # drop: identity on a constant (as in eval mode)
    return value


def constant_outputs(bn: nn.Module, removed: Tensor, path: list[fx.Node], modules: dict) -> Tensor:
    """``f(beta)`` for the removed channels of ``bn`` after the ``path`` of pointwise ops (the
    activation of a norm-activation layer first). Through a gate ``x * gate(x)`` a constant stays
    constant only when it is 0; a non-zero one is reported by :func:`fold_report` as approximate
    and dropped."""
    value = _bn_constant(bn, removed)
    for node in path:
        if node.meta.get("rnip_gate"):
            continue  # multiplies by a varying gate: only a zero constant survives as a constant
        if _depthwise(node, modules):  # a constant map through a depthwise filter: v * sum(w) + b
            conv = modules[node.target]
            value = value * conv.weight.detach()[removed].sum((1, 2, 3)).reshape(1, -1, 1, 1)
            if conv.bias is not None:
                value = value + conv.bias.detach()[removed].reshape(1, -1, 1, 1)
            continue
        value = _apply_node(node, value, modules)
    return value.reshape(-1)


def _depthwise(node: fx.Node, modules: dict) -> bool:
    m = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _avg_pool_settings(node: fx.Node, modules: dict) -> tuple | None:
    """``(padding, count_include_pad, divisor_override)`` of an average pool node, else None."""
    if node.op == "call_module" and isinstance(modules.get(node.target), nn.AvgPool2d):
        m = modules[node.target]
        return m.padding, m.count_include_pad, m.divisor_override
    if node.op == "call_function" and node.target is nn.functional.avg_pool2d:
        bound = dict(zip(_AVG_POOL_ARGS, node.args), **node.kwargs)
        return bound.get("padding", 0), bound.get("count_include_pad", True), bound.get("divisor_override")
    return None


def _keeps_constants(node: fx.Node, modules: dict) -> bool:
    """Whether a constant map stays the same constant: not so for an average pool that counts
    zero padding (the border windows) or divides by an overridden divisor (everywhere), nor for
    a zero-padded depthwise conv (the border windows)."""
    if _depthwise(node, modules):
        conv = modules[node.target]
        return conv.padding_mode != "zeros" or all(p == 0 for p in conv._reversed_padding_repeated_twice)
    settings = _avg_pool_settings(node, modules)
    if settings is None:
        return True
    padding, count_include_pad, divisor_override = settings
    padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    return divisor_override is None and not (padded and count_include_pad)


def _exact(consumer: Consumer, path: list[fx.Node], modules: dict) -> bool:
    if _gated(path) or not all(_keeps_constants(node, modules) for node in path):
        return False
    if consumer.kind == "conv":
        conv = modules[consumer.name]
        return conv.padding_mode != "zeros" or all(p == 0 for p in conv._reversed_padding_repeated_twice)
    return True


@dataclass
class Fold:
    """The constant one consumer of a group sees on the removed channels.

    ``value``: per removed channel, what is folded into the consumer's bias (0 where a gate makes
    it non-constant: dropped); ``carried``: some removed channel carries a non-zero constant on
    the way (before a gate too); ``exact``: folding ``value`` gives exactly the network whose
    removed channels have scale 0.
    """

    consumer: Consumer
    value: Tensor
    carried: bool
    exact: bool


def _unpadded(conv: nn.Conv2d) -> bool:
    return conv.padding_mode != "zeros" or all(p == 0 for p in conv._reversed_padding_repeated_twice)


class _Stream:
    """Constants of a residual stream group's removed channels, node by node (memoised): a group
    BatchNorm outputs its own constant; a sum adds; a gate drops (approximate when non-zero);
    a depthwise filter gives ``v * sum(w) + b``; any other node is the pointwise op or pooling
    the walk passed, run on the constant. Each value comes with whether it is exact."""

    def __init__(self, group: ChannelGroup, removed: Tensor, modules: dict) -> None:
        self.group, self.removed, self.modules = group, removed, modules
        self.bns = set(group.bns)
        self.nodes = {n.target: n for n in group.stream[0].graph.nodes if n.op == "call_module"}
        self.memo: dict[fx.Node, tuple[Tensor, bool] | None] = {}

    def carries(self, node) -> bool:
        """Does ``node`` carry the group's channels (is it downstream of a group BatchNorm)?"""
        return isinstance(node, fx.Node) and self.value(node) is not None

    def value(self, node: fx.Node) -> tuple[Tensor, bool] | None:
        if node not in self.memo:
            self.memo[node] = None  # a cycle cannot occur in a graph; this guards the recursion
            self.memo[node] = self._value(node)
        return self.memo[node]

    def _value(self, node: fx.Node) -> tuple[Tensor, bool] | None:
        modules = self.modules
        if node.op == "call_module" and node.target in self.bns:
            return _bn_constant(modules[node.target], self.removed), True
        if node.op in ("placeholder", "get_attr", "output") or _is_shape_query(node):
            return None
        if node.op == "call_module" and not (_depthwise(node, modules) or _passes(modules[node.target])):
            return None  # a conv or linear layer: the gate's side of a product, never the stream
        if node.target in CAT_TARGETS and node.op == "call_function":
            # The group's channels pass at an offset (the consumer's): the one listed tensor that
            # carries them. Two different ones (``cat([s, relu(s)])``) cannot be told apart here
            # (shapes are gone): their constants are dropped, approximate when non-zero.
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            carriers = list(dict.fromkeys(a for a in tensors if isinstance(a, fx.Node) and self.carries(a)))
            if not carriers:
                return None
            if len(carriers) == 1:
                return self.value(carriers[0])
            values = [self.value(a) for a in carriers]
            carried = any(bool(torch.any(v != 0)) for v, _ in values)
            return torch.zeros_like(values[0][0]), all(e for _, e in values) and not carried
        if node.target in STACK_TARGETS and node.op == "call_function":
            # A selective kernel block's paths: every listed tensor is one of the group's paths.
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            values = [self.value(a) if isinstance(a, fx.Node) else None for a in tensors]
            if not values or any(v is None for v in values):
                return None
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return torch.stack([v for v, _ in values], dim=dim), all(e for _, e in values)
        inputs = [a for a in node.args if isinstance(a, fx.Node) and self.carries(a)]
        if not inputs:
            return None
        if node.target in ADD_TARGETS and node.op != "call_module":
            values = [self.value(a) for a in inputs]
            if len(inputs) == 1:  # x + x: the same summand twice
                values = values * 2
            return sum(v for v, _ in values), all(e for _, e in values)
        value, exact = self.value(inputs[0])
        carried = bool(torch.any(value != 0))
        if node.meta.get("rnip_gate"):  # times a varying gate: only a zero constant stays constant
            return torch.zeros_like(value), exact and not carried
        if _depthwise(node, modules):
            conv = modules[node.target]
            out = value * conv.weight.detach()[self.removed].sum((1, 2, 3)).reshape(1, -1, 1, 1)
            if conv.bias is not None:
                out = out + conv.bias.detach()[self.removed].reshape(1, -1, 1, 1)
            return out, exact and (not carried or _keeps_constants(node, modules))
        out = _apply_node(node, value, modules)
        if not isinstance(out, Tensor):
            return None
        return out, exact and (not carried or _keeps_constants(node, modules))

    def fold(self, consumer: Consumer) -> Fold:
        start = consumer.path[-1] if consumer.path else self.nodes[consumer.source]
        value, exact = self.value(start)
        value = value.reshape(-1)
        carried = bool(torch.any(value != 0)) or not exact
        if consumer.kind == "conv" and torch.any(value != 0):
            exact = exact and _unpadded(self.modules[consumer.name])
        return Fold(consumer, value, carried, exact)


def _passes(m: nn.Module) -> bool:
    """A module the stream walk passes through (elementwise or pooling; no conv or linear layer)."""
    return isinstance(m, POINTWISE_MODULES + POOL_MODULES + (nn.Flatten,) + drop_path_modules())


def group_folds(group: ChannelGroup, removed: Tensor, modules: dict) -> list[Fold]:
    """Per consumer of ``group``, the constant its ``removed`` input channels carry (see :class:`Fold`)."""
    if group.stream:  # a residual stream or stacked paths: constants summed on the way
        stream = _Stream(group, removed, modules)
        return [stream.fold(c) for c in group.consumers]
    folds = []
    for c in group.consumers:
        v = constant_outputs(modules[c.source], removed, c.path, modules)
        carried = bool(torch.any(v != 0))
        gated = _gated(c.path)
        folds.append(Fold(c, torch.zeros_like(v) if gated else v, carried,
                          not carried or _exact(c, c.path, modules)))
    return folds


def fold_delta(model: nn.Module, consumer: Consumer, removed: Tensor, modules: dict | None = None,
               value: Tensor | None = None) -> Tensor | None:
    """The bias change of ``consumer`` for the ``removed`` channels (``None`` when all constants
    are 0). ``value``: the constants it sees (:func:`group_folds`); by default those of its
    source BatchNorm through its path (a plain group)."""
    modules = modules or dict(model.named_modules())
    if value is None:
        value = constant_outputs(modules[consumer.source], removed, consumer.path, modules)
        if _gated(consumer.path):
            return None  # a gated constant (not constant: reported approximate)
    v = value
    if not torch.any(v != 0):
        return None  # nothing to fold
    layer = modules[consumer.name]
    weight = layer.weight.detach()
    inputs = removed + consumer.offset  # the consumer's input channels (offset 0 unless concatenated)
    if consumer.kind == "conv":
        per_channel = weight[:, inputs].sum(dim=(2, 3))  # (out, R)
    else:
        cols = (inputs[:, None] * consumer.block + torch.arange(consumer.block, device=removed.device)).flatten()
        per_channel = weight[:, cols].reshape(weight.shape[0], len(removed), consumer.block).sum(2)
    return per_channel.to(v.dtype) @ v


def fold_report(model: nn.Module, groups: list[ChannelGroup], group_keep: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Consumers folded only approximately, and the bias-less consumers folding gives a bias."""
    modules = dict(model.named_modules())
    inexact: list[str] = []
    needs_bias: list[str] = []
    for g in groups:
        keep = group_keep[g.name]
        mask = torch.ones(g.channels, dtype=torch.bool)
        mask[keep] = False
        removed = mask.nonzero().flatten()
        if len(removed) == 0:
            continue
        for f in group_folds(g, removed, modules):
            name = f.consumer.name
            if f.carried and not f.exact and name not in inexact:
                inexact.append(name)
            if torch.any(f.value != 0) and modules[name].bias is None and name not in needs_bias:
                needs_bias.append(name)
    return inexact, needs_bias
