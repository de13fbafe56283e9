"""Folding the constant output of removed channels into the next layer's bias.

A removed channel whose scale is ~0 outputs its shift ``beta`` (0 for a bounded BatchNorm
without bias); after the pointwise ops on the way it is a constant ``v = f(beta)``. A consumer
computing ``W x + b`` then sees ``W[:, c] * v`` from that channel, which is moved into ``b``:

    conv:   b_o += v_c * sum_{kh,kw} W[o, c, kh, kw]       (exact unless zero padding)
    linear: b_o += v_c * sum_{j in block(c)} W[o, j]

Through a concatenation the consumer reads channel ``c`` as its input ``offset + c`` (see
:class:`~rnip_ext.pruning.graph.Consumer`); the concatenation itself leaves a constant as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..nn.norm_act import is_norm_act
from .graph import CAT_TARGETS, POOL_FUNCTIONS, POOL_MODULES, ChannelGroup, Consumer

__all__ = ["fold_report", "fold_delta", "constant_outputs"]

_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


def _apply_node(node: fx.Node, value: Tensor, modules: dict) -> Tensor:
    """Run one pointwise node of the path on a ``(1, R, 1, 1)`` tensor of constants."""
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


def constant_outputs(bn: nn.Module, removed: Tensor, path: list[fx.Node], modules: dict) -> Tensor:
    """``f(beta)`` for the removed channels of ``bn`` after the ``path`` of pointwise ops (the
    activation of a norm-activation layer first). Through a gate ``x * gate(x)`` a constant stays
    constant only when it is 0; a non-zero one is reported by :func:`fold_report` as approximate
    and dropped."""
    bias = getattr(bn, "bias", None)
    beta = bias.detach()[removed] if bias is not None else torch.zeros(len(removed), device=removed.device)
    value = beta.reshape(1, -1, 1, 1)
    if is_norm_act(bn):
        value = bn.act(value.clone())  # drop: identity on a constant (as in eval mode)
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


def fold_delta(model: nn.Module, consumer: Consumer, removed: Tensor, modules: dict | None = None) -> Tensor | None:
    """The bias change of ``consumer`` for the ``removed`` channels (``None`` when all constants are 0)."""
    modules = modules or dict(model.named_modules())
    v = constant_outputs(modules[consumer.source], removed, consumer.path, modules)
    if not torch.any(v != 0) or _gated(consumer.path):
        return None  # nothing to fold, or a gated constant (not constant: reported approximate)
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
        for c in g.consumers:
            v = constant_outputs(modules[c.source], removed, c.path, modules)
            if not torch.any(v != 0):
                continue
            if not _exact(c, c.path, modules) and c.name not in inexact:
                inexact.append(c.name)
            layer = modules[c.name]
            if layer.bias is None and c.name not in needs_bias and not _gated(c.path):
                needs_bias.append(c.name)
    return inexact, needs_bias
