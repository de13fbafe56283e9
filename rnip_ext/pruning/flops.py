"""Parameter and FLOP counts.

FLOPs follow the convention of the pruning literature: multiply-accumulate operations of the
convolutions and linear layers for one forward pass of the given input (BatchNorm, activations
and pooling are not counted: they are linear in the channel count and negligible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .graph import eval_mode

__all__ = ["LayerCost", "channel_costs", "costs_from_graph", "count_flops", "count_params", "layer_costs"]


@dataclass
class LayerCost:
    """What one conv/linear layer costs: ``positions * out * (in / groups) * kernel`` MACs."""

    positions: int
    out_features: int
    in_per_group: int
    kernel: int

    @property
    def macs(self) -> int:
        return self.positions * self.out_features * self.in_per_group * self.kernel


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise ValueError("example_inputs is required to count FLOPs: pass e.g. torch.randn(1, 3, 32, 32)")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@torch.no_grad()
def layer_costs(model: nn.Module, example_inputs) -> dict[str, LayerCost]:
    """Run ``model`` once in eval mode on ``example_inputs`` and record each conv/linear layer's cost."""
    costs: dict[str, LayerCost] = {}
    hooks = []

    def hook_for(name):
        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                positions = output.shape[0] * output.shape[2] * output.shape[3]
                cost = LayerCost(positions, module.out_channels, module.in_channels // module.groups,
                                 math.prod(module.kernel_size))
            else:
                cost = LayerCost(output.numel() // output.shape[-1], module.out_features, module.in_features, 1)
            if name in costs:  # a layer called twice costs twice
                costs[name].positions += cost.positions
            else:
                costs[name] = cost
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook_for(name)))
    try:
        with eval_mode(model):
            model(*_as_tuple(example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return costs


def costs_from_graph(gm: fx.GraphModule) -> dict[str, LayerCost]:
    """The same costs as :func:`layer_costs`, read from a shape-propagated fx graph (no forward pass)."""
    costs: dict[str, LayerCost] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        shape = tuple(node.meta["tensor_meta"].shape)
        if isinstance(module, nn.Conv2d):
            cost = LayerCost(shape[0] * shape[2] * shape[3], module.out_channels,
                             module.in_channels // module.groups, math.prod(module.kernel_size))
        else:
            cost = LayerCost(math.prod(shape) // shape[-1], module.out_features, module.in_features, 1)
        if node.target in costs:
            costs[node.target].positions += cost.positions
        else:
            costs[node.target] = cost
    return costs


def count_flops(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of all conv and linear layers for one forward pass of ``example_inputs``."""
    return sum(c.macs for c in layer_costs(model, example_inputs).values())


COSTS = ("flops", "params")


def channel_costs(model: nn.Module, example_inputs, cost: str = "flops") -> dict[str, float]:
    """What one channel of each prunable BatchNorm carries: ``{BatchNorm name: cost per channel}``.

    ``cost="flops"``: the multiply-accumulates (for ``example_inputs``) that go with the channel
    when it is removed -- its producer conv's filter (``positions * in/groups * k*k``), a
    depthwise conv's filter on the way, and its consumers' input slices (``positions * out *
    k*k`` for a conv, ``rows * out * block`` for a linear layer after a flatten). ``"params"``:
    the parameters removed with it (those filter slices, biases, and the BatchNorms' scale and
    shift). Every channel of a group costs the same, and a group of coupled BatchNorms
    (depthwise) splits its channel cost equally among them. BatchNorms outside any prunable
    group are not listed (their channels cannot be removed).
    """
    from .graph import analyse

    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    groups, gm = analyse(model, _as_tuple(example_inputs))
    costs = costs_from_graph(gm)
    modules = dict(model.named_modules())

    def n_params(m: nn.Module, *, out: bool) -> int:
        """Parameters of ``m`` per output channel (``out``) or per input channel."""
        total = 0
        for p in m.parameters(recurse=False):
            if out:
                total += p[0].numel() if p.dim() > 0 else 0
            elif p.dim() > 1:
                total += p[:, 0].numel()
        return total

    result: dict[str, float] = {}
    for g in groups:
        if cost == "flops":
            c = costs[g.producer]
            per_channel = c.positions * c.in_per_group * c.kernel
            for name in g.depthwise:
                d = costs[name]
                per_channel += d.positions * d.in_per_group * d.kernel
            for consumer in g.consumers:
                d = costs[consumer.name]
                per_channel += d.positions * d.out_features * d.kernel * consumer.block
        else:
            per_channel = n_params(modules[g.producer], out=True)
            per_channel += sum(n_params(modules[n], out=True) for n in g.bns + g.depthwise)
            per_channel += sum(n_params(modules[c.name], out=False) * c.block for c in g.consumers)
        for name in g.bns:
            result[name] = per_channel / len(g.bns)
    return result
