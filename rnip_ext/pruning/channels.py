"""One channel graph per model: groups, blockers and per-layer costs from a single trace, cached.

:func:`channel_graph` traces a model once (``torch.fx``, one shape propagation for the example
inputs) and keeps the result, a :class:`ChannelGraph`, in a per-model cache; planning, FLOP and
parameter counts, importance and the budget search all read it. The cache entry is checked
against a cheap structural signature (every module's identity, type, mode and tensor shapes)
on each use, so a model changed behind the cache's back is traced again; :func:`apply` hands the
pruned model a narrowed copy of its graph (:meth:`ChannelGraph.narrowed`), so pruning during
training costs no new trace.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .graph import (Blocker, ChannelGroup, PruningTraceError, check_residual_streams, eval_mode, groups_of,
                    propagate_shapes, trace_for_pruning)
from .layers import LayerCost, handler_for
from .se import SEBlock, find_se_blocks

__all__ = ["ChannelGraph", "channel_graph", "forget", "module_slices", "count_params", "traces"]

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
traces = [0]  # how many graphs were built (traced) since import: for benchmarks and tests


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _expand(index: Tensor, block: int) -> Tensor:
    """Channel indices -> the feature indices of their ``block``-sized blocks after a flatten."""
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block)).flatten()


def _removed(channels: int, keep: Tensor) -> Tensor:
    """The channel indices of ``range(channels)`` not in ``keep``, ascending."""
    mask = torch.ones(channels, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def module_slices(groups: list[ChannelGroup], group_keep: dict[str, Tensor], se_blocks: list[SEBlock] = (),
                  se_keep: dict[str, Tensor] | None = None) -> dict[str, list]:
    """``{module name: [out_index or None, in_index or None]}`` for every module the plan slices
    (a group's channels leave the outputs of all its producers, BatchNorms, channel-wise convs
    and gates, and the inputs of all its consumers; a selective kernel attention's select conv,
    whose outputs are one block of the group's channels per path, loses them in every block; a
    squeeze-and-excitation block's inner channels, kept as ``se_keep[block.name]``, leave
    ``reduce``'s outputs and ``expand``'s inputs). The two dimensions of one layer are
    independent: an SE ``reduce`` conv may lose inputs to the gated group and outputs to its own
    inner width.

    A consumer reading a concatenation (``width`` set) keeps every input feature except each
    feeding group's removed channels at that group's ``offset``: ``(offset + c) * block + j``.
    """
    slices: dict[str, list] = {}
    concatenated: dict[str, Tensor] = {}  # consumer of a concatenation -> which input features stay

    def put(name: str, dim: int, index: Tensor) -> None:
        slices.setdefault(name, [None, None])[dim] = index

    for g in groups:
        keep = group_keep[g.name]
        if len(keep) == g.channels:
            continue
        for name in [*g.producers, *g.bns, *g.depthwise, *g.gates]:
            put(name, 0, keep)
        for name, paths in g.selects.items():  # output m * channels + c: path m's weight of channel c
            put(name, 0, (torch.arange(paths)[:, None] * g.channels + keep).flatten())
        removed = None
        for c in g.consumers:
            if c.width is None:
                put(c.name, 1, _expand(keep, c.block))
                continue
            removed = _removed(g.channels, keep) if removed is None else removed
            mask = concatenated.setdefault(c.name, torch.ones(c.width * c.block, dtype=torch.bool))
            mask[_expand(removed + c.offset, c.block)] = False
    for name, mask in concatenated.items():
        put(name, 1, mask.nonzero().flatten())
    for b in se_blocks:
        keep = (se_keep or {}).get(b.name)
        if keep is not None and len(keep) < b.channels:
            put(b.reduce, 0, keep)
            put(b.expand, 1, keep)
    return slices


def _shifted_consumers(groups: list[ChannelGroup], full: dict[str, Tensor]) -> dict[tuple[str, str, int], tuple]:
    """``{(group, consumer, offset): (new offset, new width)}`` of the concatenation consumers once
    every group keeps ``full[group]``: a range moves left by the channels removed before it, the
    width shrinks by all the channels removed."""
    ranges: dict[str, list[tuple[int, int, str]]] = {}  # consumer -> [(offset, removed, group)]
    for g in groups:
        lost = g.channels - len(full[g.name])
        for c in g.consumers:
            if c.width is not None:
                ranges.setdefault(c.name, []).append((c.offset, lost, g.name))
    shifted = {}
    for g in groups:
        for c in g.consumers:
            if c.width is not None:
                entries = ranges[c.name]
                before = sum(lost for at, lost, _ in entries if at < c.offset)
                shifted[(g.name, c.name, c.offset)] = (c.offset - before, c.width - sum(e[1] for e in entries))
    return shifted


def _signature(model: nn.Module) -> tuple:
    """What the graph depends on: module objects, types and tensor shapes."""
    sig = []
    for name, m in model.named_modules():
        shapes = tuple((k, None if t is None else tuple(t.shape))
                       for k, t in (*m._parameters.items(), *m._buffers.items()))
        sig.append((name, id(m), shapes))
    return tuple(sig)


def _modes(model: nn.Module) -> tuple:
    """Every module's training flag: a forward may branch on it (auxiliary heads), so the trace does."""
    return tuple(m.training for m in model.modules())


def _input_key(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, Tensor) else (type(x).__name__, id(x)) for x in inputs)


@dataclass
class ChannelGraph:
    """What pruning needs to know about a model, from one trace.

    Attributes:
        groups: the prunable channel groups (:class:`~rnip_ext.pruning.ChannelGroup`), in graph order.
        blockers: for each BatchNorm outside every group, the construct that blocks it.
        costs: ``{layer name: LayerCost}`` of every conv and linear layer (empty without example inputs).
        opaque: modules fx could not trace through, kept whole: ``{name: why}``.
        param_shapes: ``{module name: [(attr, shape)]}`` of the modules the groups slice.
        params_total: the model's parameter count.
        residual_streams: whether residual streams are coupled into groups (see
            :func:`rnip_ext.pruning.find_channel_groups`) or kept whole (the default).
        se_blocks: the squeeze-and-excitation bottlenecks (:class:`~rnip_ext.pruning.se.SEBlock`),
            whose inner width ``plan(..., se_ratio=...)`` prunes; ``se_keep`` arguments below
            name the kept inner channels of those that lose any.
    """

    groups: list[ChannelGroup]
    blockers: list[Blocker]
    costs: dict[str, LayerCost]
    opaque: dict[str, str]
    param_shapes: dict[str, list[tuple[str, tuple]]]
    params_total: int
    channelwise: set[str] = field(default_factory=set)
    residual_streams: bool = False
    se_blocks: list[SEBlock] = field(default_factory=list)

    def slices(self, group_keep: dict[str, Tensor] | None = None,
               se_keep: dict[str, Tensor] | None = None) -> dict[str, list]:
        """:func:`module_slices` of this graph's groups and SE blocks."""
        return module_slices(self.groups, self._full(group_keep or {}), self.se_blocks, se_keep)

    @property
    def flops_total(self) -> int:
        """Multiply-accumulates of every conv and linear layer for the example inputs."""
        return sum(c.macs for c in self.costs.values())

    def flops(self, group_keep: dict[str, Tensor] | None = None, se_keep: dict[str, Tensor] | None = None) -> int:
        """MACs of the network keeping ``group_keep`` (kept channel indices per group name; groups
        not named keep all) and ``se_keep`` (per SE block): the changed layers' costs recounted
        with their new widths."""
        total = self.flops_total
        if not group_keep and not se_keep:
            return total
        for name, (out_idx, in_idx) in self.slices(group_keep, se_keep).items():
            c = self.costs.get(name)
            if c is None:
                continue
            out_f = c.out_features if out_idx is None else len(out_idx)
            in_g = c.in_per_group if in_idx is None or name in self.channelwise else len(in_idx)
            total += c.positions * c.kernel * (out_f * in_g - c.out_features * c.in_per_group)
        return total

    def params(self, group_keep: dict[str, Tensor] | None = None, new_biases=(),
               new_bias_sizes: dict[str, int] | None = None, se_keep: dict[str, Tensor] | None = None) -> int:
        """Parameters of the network keeping ``group_keep`` (and ``se_keep``), plus the biases
        folding creates on the layers ``new_biases`` (each sized by that layer's outputs after pruning)."""
        slices = self.slices(group_keep, se_keep)
        added = 0
        for name in new_biases:
            out_idx = slices.get(name, [None, None])[0]
            added += dict(self.param_shapes[name])["weight"][0] if out_idx is None else len(out_idx)
        removed = 0
        for name, (out_idx, in_idx) in slices.items():
            for _, shape in self.param_shapes[name]:
                new = list(shape)
                if out_idx is not None:
                    new[0] = len(out_idx)
                if in_idx is not None and len(shape) > 1:
                    new[1] = len(in_idx)
                removed += math.prod(shape) - math.prod(new)
        return self.params_total - removed + added

    def prunable_flops(self) -> int:
        """MACs of the layers some group slices: what pruning can change at all."""
        touched = {n for g in self.groups for n in g.modules()}
        return sum(c.macs for n, c in self.costs.items() if n in touched)

    def blocked_summary(self, limit: int = 3) -> str:
        """The constructs that block BatchNorms, most frequent first, with examples (and, where
        residual additions block and streams were not coupled, the option that would)."""
        by_construct: dict[str, list[str]] = {}
        for b in self.blockers:
            key = b.construct.split(" (")[0] if b.construct.startswith("no conv") else b.construct
            by_construct.setdefault(key, []).append(b.where)
        parts = []
        for construct, where in sorted(by_construct.items(), key=lambda kv: -len(kv[1])):
            examples = ", ".join(list(dict.fromkeys(where))[:limit])
            parts.append(f"{construct} ({len(where)} BatchNorm{'s' if len(where) > 1 else ''}, e.g. at {examples})")
        if not parts:
            return "nothing"
        hint = ("" if self.residual_streams or "residual addition" not in by_construct
                else " (residual_streams=True prunes each residual stream as one group)")
        return "; ".join(parts) + hint

    def _full(self, group_keep: dict[str, Tensor]) -> dict[str, Tensor]:
        by_name = {g.name: g for g in self.groups}
        full = {name: torch.arange(g.channels) for name, g in by_name.items()}
        full.update({k: v for k, v in group_keep.items() if k in by_name})
        return full

    def narrowed(self, group_keep: dict[str, Tensor], new_biases: dict[str, int],
                 se_keep: dict[str, Tensor] | None = None) -> "ChannelGraph":
        """The graph of the model once ``group_keep`` (and ``se_keep``) is applied (no new
        trace): every group and SE block keeps its structure with its new width, every sliced
        layer its new costs and shapes."""
        full = self._full(group_keep)
        se_keep = se_keep or {}
        slices = module_slices(self.groups, full, self.se_blocks, se_keep)
        shifted = _shifted_consumers(self.groups, full)
        groups = [replace(g, channels=len(full[g.name]),
                          consumers=[c if c.width is None else replace(
                              c, offset=shifted[(g.name, c.name, c.offset)][0],
                              width=shifted[(g.name, c.name, c.offset)][1]) for c in g.consumers])
                  for g in self.groups]
        costs = dict(self.costs)
        for name, (out_idx, in_idx) in slices.items():
            c = costs.get(name)
            if c is not None:
                costs[name] = LayerCost(
                    c.positions, c.out_features if out_idx is None else len(out_idx),
                    c.in_per_group if in_idx is None or name in self.channelwise else len(in_idx), c.kernel)
        shapes = {}
        for name, entries in self.param_shapes.items():
            out_idx, in_idx = slices.get(name, [None, None])
            new = []
            for attr, shape in entries:
                s = list(shape)
                if out_idx is not None and s:
                    s[0] = len(out_idx)
                if in_idx is not None and len(s) > 1:
                    s[1] = len(in_idx)
                new.append((attr, tuple(s)))
            if name in new_biases:
                new.append(("bias", (new_biases[name],)))
            shapes[name] = new
        params = self.params(full, list(new_biases), se_keep=se_keep)
        se_blocks = [replace(b, channels=len(se_keep[b.name])) if b.name in se_keep else b for b in self.se_blocks]
        return ChannelGraph(groups, list(self.blockers), costs, dict(self.opaque), shapes, params, set(self.channelwise),
                            self.residual_streams, se_blocks)


def _costs(model: nn.Module, gm, example_inputs, opaque: dict[str, str]) -> dict[str, LayerCost]:
    """Run the shape propagation and read every conv/linear layer's cost off the output shapes;
    layers inside opaque modules are measured by forward hooks during the same run."""
    modules = dict(model.named_modules())
    costs: dict[str, LayerCost] = {}

    def add(name: str, module: nn.Module, shape: tuple) -> None:
        cost = handler_for(module).cost(module, tuple(shape))
        if cost is None:
            return
        if name in costs:  # a layer called twice costs twice
            costs[name].positions += cost.positions
        else:
            costs[name] = cost

    hooks = []
    inner = [(n, m) for n, m in modules.items() if handler_for(m) is not None
             and any(n.startswith(o + ".") for o in opaque)]
    for name, m in inner:
        hooks.append(m.register_forward_hook(lambda mod, i, out, name=name: add(name, mod, out.shape)))
    try:
        propagate_shapes(model, gm, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in opaque:
            continue
        m = modules[node.target]
        meta = node.meta.get("tensor_meta")
        if handler_for(m) is not None and meta is not None and hasattr(meta, "shape"):
            add(node.target, m, meta.shape)
    return costs


def _build(model: nn.Module, example_inputs, residual_streams: bool = False) -> ChannelGraph:
    gm, opaque = trace_for_pruning(model)
    traces[0] += 1
    costs = _costs(model, gm, example_inputs, opaque) if example_inputs is not None else {}
    groups, blockers = groups_of(model, gm, opaque, residual_streams)
    se_blocks = find_se_blocks(model, gm, opaque)  # before the shapes are dropped below
    # The groups keep nodes of this graph (the consumers' paths): keep nothing else alive with
    # them (the GraphModule holds the model's layers; a pruned copy's graph must not hold the original's).
    gm.graph.owning_module = None
    for node in gm.graph.nodes:
        node.meta = {"rnip_gate": True} if node.meta.get("rnip_gate") else {}
    for name, why in opaque.items():
        blockers.append(Blocker(name, f"module fx cannot trace, kept whole ({why})", name))
    modules = dict(model.named_modules())
    names = {n for g in groups for n in g.modules()} | {n for b in se_blocks for n in b.modules()}
    shapes = {n: [(k, tuple(p.shape)) for k, p in modules[n]._parameters.items() if p is not None] for n in names}
    channelwise = {n for g in groups for n in g.depthwise}
    return ChannelGraph(groups, blockers, costs, opaque, shapes, count_params(model), channelwise, residual_streams,
                        se_blocks)


def channel_graph(model: nn.Module, example_inputs=None, *, residual_streams: bool = False) -> ChannelGraph:
    """The :class:`ChannelGraph` of ``model`` for inputs shaped like ``example_inputs`` (cached).

    Built by one ``torch.fx`` trace and, with ``example_inputs``, one shape propagation; reused
    while the model's structure (modules and tensor shapes) is unchanged, one per input shape,
    training mode (a forward may branch on ``self.training``) and ``residual_streams``
    (``True``: each residual stream is one channel group, see
    :func:`rnip_ext.pruning.find_channel_groups`; ``False``, the default: streams are kept
    whole, as in the paper). Raises :class:`~rnip_ext.pruning.PruningTraceError` when the
    model's own forward cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    check_residual_streams(residual_streams)
    # One graph per input shape, mode and coupling of streams.
    key = (_input_key(example_inputs), _modes(model), residual_streams)
    sig = _signature(model)
    entries = _CACHE.setdefault(model, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    graph = _build(model, example_inputs, residual_streams)
    # Shapes changed (or first use): entries for other inputs are stale too.
    entries = {k: v for k, v in entries.items() if v[0] == sig}
    entries[key] = (sig, graph)
    _CACHE[model] = entries
    return graph


def costs_graph(model: nn.Module, example_inputs) -> ChannelGraph:
    """A graph of ``model`` for these inputs to read costs from (they do not depend on
    ``residual_streams``): any cached one that still matches, else the default one."""
    if isinstance(model, nn.Module):
        prefix = (_input_key(example_inputs), _modes(model))
        sig = None
        for key, (built_for, graph) in _CACHE.get(model, {}).items():
            if key[:2] == prefix:
                sig = sig or _signature(model)
                if built_for == sig:
                    return graph
    return channel_graph(model, example_inputs)


def remember(model: nn.Module, graphs: list[tuple[tuple | None, ChannelGraph]]) -> None:
    """Cache ``graphs`` (input key, graph) for ``model`` under its current signature (``apply``
    hands the pruned model the narrowed graphs of the original)."""
    sig = _signature(model)
    _CACHE[model] = {key: (sig, g) for key, g in graphs}


def cached(model: nn.Module) -> list[tuple[tuple | None, ChannelGraph]]:
    """The graphs cached for ``model`` that still match it, with their input keys."""
    entries = _CACHE.get(model, {})
    if not entries:
        return []
    sig = _signature(model)
    return [(k, v[1]) for k, v in entries.items() if v[0] == sig]


def forget(model: nn.Module) -> None:
    """Drop every cached graph of ``model`` (the next use traces it again)."""
    _CACHE.pop(model, None)


def layer_shapes_via_hooks(model: nn.Module, example_inputs) -> dict[str, LayerCost]:
    """The costs of a model fx cannot trace at all: one forward pass with hooks, the same cost rules."""
    costs: dict[str, LayerCost] = {}
    hooks = []

    def hook_for(name):
        def hook(module, inputs, output):
            cost = handler_for(module).cost(module, tuple(output.shape))
            if cost is None:
                return
            if name in costs:
                costs[name].positions += cost.positions
            else:
                costs[name] = cost
        return hook

    for name, module in model.named_modules():
        if handler_for(module) is not None:
            hooks.append(module.register_forward_hook(hook_for(name)))
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return costs


_ = PruningTraceError  # re-exported for callers catching trace failures here
