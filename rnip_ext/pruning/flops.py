"""Parameter and FLOP counts, read off the model's :class:`~rnip_ext.pruning.channels.ChannelGraph`.

FLOPs follow the convention of the pruning literature: multiply-accumulate operations of the
convolutions and linear layers (and their subclasses) for one forward pass of the given input
(BatchNorm, activations and pooling are not counted: they are linear in the channel count and
negligible). Each layer's cost rule lives in its handler (:mod:`rnip_ext.pruning.layers`): the
one FLOP counter of the package.
"""

from __future__ import annotations

from torch import nn

from .channels import channel_graph, costs_graph, count_params, layer_shapes_via_hooks
from .graph import PruningTraceError, check_residual_streams
from .layers import LayerCost

__all__ = ["LayerCost", "channel_costs", "count_flops", "count_params", "layer_costs"]


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        raise ValueError("example_inputs is required to count FLOPs: pass e.g. torch.randn(1, 3, 32, 32)")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def layer_costs(model: nn.Module, example_inputs) -> dict[str, LayerCost]:
    """Each conv/linear layer's cost for one forward pass of ``example_inputs`` (from the cached
    graph; a model fx cannot trace at all is run once with hooks, under the same cost rules)."""
    inputs = _as_tuple(example_inputs)
    try:
        return dict(costs_graph(model, inputs).costs)
    except PruningTraceError:
        return layer_shapes_via_hooks(model, inputs)


def count_flops(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of all conv and linear layers for one forward pass of ``example_inputs``."""
    return sum(c.macs for c in layer_costs(model, example_inputs).values())


COSTS = ("flops", "params")


def channel_costs(model: nn.Module, example_inputs, cost: str = "flops", *,
                  residual_streams: bool = False) -> dict[str, float]:
    """What one channel of each prunable BatchNorm carries: ``{BatchNorm name: cost per channel}``.

    ``cost="flops"``: the multiply-accumulates (for ``example_inputs``) that go with the channel
    when it is removed -- its producer conv's filter (``positions * in/groups * k*k``), a
    depthwise or grouped conv's filter and a gate conv's filter on the way (a selective kernel
    attention's select conv: one filter per path), and its consumers'
    input slices (``positions * out * k*k`` for a conv, ``rows * out * block`` for a linear layer
    after a flatten). ``"params"``: the parameters removed with it (those filter slices, biases,
    and the BatchNorms' scale and shift). Every channel of a group costs the same, and a group of
    coupled BatchNorms (depthwise, or a residual stream) splits its channel cost equally among
    them. BatchNorms outside any prunable group are not listed (their channels cannot be removed).

    ``residual_streams`` (default ``False``: streams are kept whole and their BatchNorms are not
    listed): ``True`` reads the groups of :func:`rnip_ext.pruning.find_channel_groups` with
    ``residual_streams=True``, where a residual stream is one group, so a stream's channel costs
    what removing it from the whole stream saves: every producer's filter, every consumer's input
    slice. A conv that reads a stream and writes into the same one (RepVGG) loses the channel on
    both sides, the weight at their crossing once.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    graph = channel_graph(model, _as_tuple(example_inputs), residual_streams=check_residual_streams(residual_streams))
    costs = graph.costs
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
    for g in graph.groups:
        # A consumer that is also a producer of the group (RepVGG) counts the weights of the
        # removed output channel at the removed input channel twice: subtract them once.
        both = [c for c in g.consumers if c.name in g.producers]
        if cost == "flops":
            per_channel = 0
            for name in [*g.producers, *g.depthwise, *g.gates]:
                c = costs[name]
                per_channel += c.positions * c.in_per_group * c.kernel
            for name, paths in g.selects.items():  # one output per path (selective kernel attention)
                c = costs[name]
                per_channel += c.positions * c.in_per_group * c.kernel * paths
            for consumer in g.consumers:
                d = costs[consumer.name]
                per_channel += d.positions * d.out_features * d.kernel * consumer.block
            per_channel -= sum(costs[c.name].positions * costs[c.name].kernel * c.block for c in both)
        else:
            per_channel = sum(n_params(modules[n], out=True) for n in [*g.producers, *g.bns, *g.depthwise, *g.gates])
            per_channel += sum(n_params(modules[n], out=True) * paths for n, paths in g.selects.items())
            per_channel += sum(n_params(modules[c.name], out=False) * c.block for c in g.consumers)
            per_channel -= sum(modules[c.name].weight[0, 0].numel() * c.block for c in both)
        for name in g.bns:
            result[name] = per_channel / len(g.bns)
    return result
