"""Which channels can go: channel groups derived from a ``torch.fx`` trace of the model.

A *channel group* is a set of BatchNorm layers whose channels must be removed together, with
every weight those channels touch:

    producer conv (groups=1) -> BN -> [pointwise / pooling / flatten / gate ...] -> consumers

(pointwise: activations, dropout, and stochastic depth / drop path, which scales whole samples:
see :data:`DROP_PATH_MODULES`).

Consumers are convolutions with ``groups=1`` (their input channels are sliced) and linear layers
after a flatten (blocks of ``H*W`` input features per channel are sliced). A depthwise or grouped
convolution with as many outputs as inputs passes the removal through itself: it is sliced too
(grouped ones lose whole groups of ``unit`` channels) and the BatchNorm right after it joins the
group with identical indices. A channel-wise gate ``x * gate(x)`` (squeeze-and-excitation: the
gate is a conv through an elementwise activation) couples the gate conv's output channels with
the group. A concatenation along the channels (``torch.cat``/``torch.concat``, ``dim=1`` or
``-3`` of 4-D tensors; it needs the shapes of example inputs) is passed too: the layers reading
its output see the group's channels at an *offset* (the widths of the inputs listed before it),
recorded on each :class:`Consumer`, and only pointwise ops, pooling, flattening, further
concatenations and consumers may follow it (VoVNet's and GhostNet's aggregations, Inception's
branches into the next block's convs). The parallel paths of a selective kernel block
(``torch.stack`` of conv-BN paths, weighted per path and channel by an attention, summed over the
paths: timm's ``SelectiveKernel``) are one group: see :mod:`rnip_ext.pruning.selective`.
Anything else on the way (a residual addition, a
BatchNorm or a split after a concatenation, a reshape that mixes channels, the graph's output,
a module used twice, a module fx cannot trace) leaves the group alone, and is recorded as the
*blocker* of that BatchNorm: that is how residual streams stay untouched while the inner
channels of each block are pruned, as in the paper (the default).

With ``residual_streams=True`` (opt-in) a residual addition couples instead of blocking: the
whole *stream* (every tensor summed into it, the sums, and the pointwise ops and pooling on it)
becomes one channel group. Its BatchNorms are every BatchNorm summed into the stream with its
own producer conv (the last BatchNorm of each block, a projection shortcut's, the stem's before
a pool: all of them in :attr:`ChannelGroup.producers`) and every BatchNorm that reads the stream
with no conv of its own and is summed back into it (RepVGG's identity branch: only sliced);
every conv or linear layer reading the stream (the next blocks' convs, the next stage's
projection, the classifier after pooling, a conv after a concatenation at its offset) is a
consumer. A stream that meets anything else (an option-A shortcut's strided slicing and zero
padding, a concatenation into anything but consumers, a sum of concatenations, a product that is
not a gate, a BatchNorm reading the stream whose output is not summed back into it, the
network's input or output) stays whole, with that construct as the blocker of its BatchNorms.

Per-layer-type rules (roles, costs, slicing) come from :mod:`rnip_ext.pruning.layers`.
"""

from __future__ import annotations

import contextlib
import math
import operator
import sys
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn import BoundedBatchNorm2d
from ..nn.norm_act import is_norm_act
from .layers import handler_for

__all__ = ["Blocker", "ChannelGroup", "Consumer", "PruningTraceError", "find_channel_groups", "is_prunable_bn"]


class PruningTraceError(RuntimeError):
    """The model could not be traced with ``torch.fx``, so its channel dependencies are unknown."""


def is_prunable_bn(module: nn.Module) -> bool:
    """Bounded BatchNorms and ``nn.BatchNorm2d`` with their subclasses (norm-activation layers
    included; not ``SyncBatchNorm``) can be pruned."""
    handler = handler_for(module)
    return handler is not None and handler.role(module) == "norm"


# Modules and functions that act on each element independently: channel-preserving, and a
# constant channel stays a constant channel (its value is what the op computes on it).
POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)
POINTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.dropout, F.dropout2d, torch.relu, torch.sigmoid,
    torch.tanh, F.sigmoid, F.tanh, torch.nn.functional.relu_,
}
POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "contiguous"}
# Spatial ops that keep channels apart; a constant channel stays constant through them (with
# the exception recorded by ``_pool_keeps_constants``).
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
MUL_TARGETS = {operator.mul, torch.mul, "mul"}
ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
CAT_TARGETS = {torch.cat, torch.concat}
# Shape-only changes between a pooled tensor and a Conv1d over its channels (ECA).
RESHAPES = {"view", "reshape", "squeeze", "unsqueeze", "transpose", "permute", "flatten"}
# Parallel paths stacked along a new dimension (timm's SelectiveKernel): see :mod:`.selective`.
STACK_TARGETS = {torch.stack}

# Stochastic depth / drop path: each *sample* is multiplied by 0 or 1/(1-p) in training and
# passed unchanged in eval mode, so channels never mix (channel-wise elementwise). torchvision's
# and timm's are recognised where those libraries are imported (a model built with them has
# imported them; this package imports neither): ``(module, attribute)`` pairs, looked up in
# ``sys.modules``. The modules are kept as leaves of the trace, so the graph is the same in
# training and eval mode (traced through in training, timm's would show its random mask as a
# product that blocks); the functions are wrapped (torchvision's is ``torch.fx.wrap``-ed already,
# timm's ``drop_path`` is autowrapped by the tracer).
DROP_PATH_MODULES = (("timm.layers.drop", "DropPath"), ("timm.models.layers.drop", "DropPath"),
                     ("torchvision.ops.stochastic_depth", "StochasticDepth"))
DROP_PATH_FUNCTIONS = (("timm.layers.drop", "drop_path"), ("timm.models.layers.drop", "drop_path"),
                       ("torchvision.ops.stochastic_depth", "stochastic_depth"))


def _imported(names: tuple[tuple[str, str], ...]) -> tuple:
    """The objects ``module.attribute`` of ``names`` whose module is imported, each once."""
    found = []
    for module, attr in names:
        obj = getattr(sys.modules.get(module), attr, None)
        if obj is not None and obj not in found:
            found.append(obj)
    return tuple(found)


def drop_path_modules() -> tuple[type, ...]:
    """The per-sample drop module classes (timm's ``DropPath``, torchvision's ``StochasticDepth``)
    of the libraries imported so far."""
    return tuple(c for c in _imported(DROP_PATH_MODULES) if isinstance(c, type))


def drop_path_functions() -> tuple:
    """The per-sample drop functions (timm's ``drop_path``, torchvision's ``stochastic_depth``)
    of the libraries imported so far."""
    return tuple(f for f in _imported(DROP_PATH_FUNCTIONS) if callable(f) and not isinstance(f, type))


def is_drop_path(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is ``node`` a stochastic depth / drop path (module or function call)? The identity in eval
    mode; in training it scales each sample, which a folded constant does not follow (see
    :mod:`rnip_ext.pruning.folding`)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), drop_path_modules())
    return node.op == "call_function" and node.target in drop_path_functions()


def _is_add(node: fx.Node) -> bool:
    """A sum of tensors: ``a + b``, ``a += b``, ``torch.add``, ``a.add(b)``, ``a.add_(b)``."""
    return node.op in ("call_function", "call_method") and node.target in ADD_TARGETS


@dataclass
class Consumer:
    """A layer reading the group's channels: ``kind`` is ``"conv"`` or ``"linear"``.

    ``block`` is the number of consecutive input features per channel of a linear layer after a
    flatten (``H*W``; 1 for a conv). ``source`` is the BatchNorm whose output it reads and
    ``path`` the nodes in between (used to fold the constant output of removed channels).

    Through a channel concatenation the layer reads a wider tensor: ``width`` is its channel
    count and ``offset`` where the group's channels start in it, so the group's channel ``c`` is
    the layer's input channel ``offset + c`` (input features ``(offset + c) * block + j``).
    ``width`` is ``None`` (and ``offset`` 0) when the layer reads the group's channels alone.
    Several groups (or one group at several offsets) may feed one such layer: its kept inputs
    are all of them minus each group's removed channels at that group's offset.
    """

    name: str
    kind: str
    block: int
    source: str
    path: list[fx.Node] = field(default_factory=list)
    offset: int = 0
    width: int | None = None


@dataclass
class ChannelGroup:
    """BatchNorms whose channels go together, and every layer sliced with them.

    ``depthwise``: the channel-wise convolutions (depthwise or grouped, ``in == out``) the group
    passes through; ``gates``: convolutions whose output channels gate the group's channels
    (``x * sigmoid(conv(...))``), sliced on their outputs; ``unit``: channels are removed in
    aligned blocks of this many (the widest group of a grouped convolution on the way; 1 without).

    ``producers``: every conv whose output channels are the group's, sliced on their outputs;
    ``producer`` is the first (a plain group has one; a residual stream, with
    ``residual_streams=True``, one per BatchNorm summed into it with a conv of its own). A conv
    may be both a producer and a consumer of one stream group (RepVGG: it reads the stream and
    writes into it). ``stream``: the stream's graph nodes (empty for a plain group), read when
    folding; :attr:`residual` and :attr:`additions` say whether and which sums it couples.

    A selective kernel block's stacked paths (:mod:`rnip_ext.pruning.selective`) are one group
    too: one producer and BatchNorm per path, :attr:`stacked`; ``selects``: the attention convs
    whose outputs hold one block of the group's channels per path, sliced in every block.
    :attr:`summed` (a stream or stacked paths): the BatchNorms are scored by their maximum.
    """

    bns: list[str]
    producer: str
    channels: int
    depthwise: list[str] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    # Every consumer is a conv whose output goes straight into a BatchNorm: that BatchNorm
    # renormalises, so a common scale of the group's channels carries no information.
    renormalised: bool = False
    gates: list[str] = field(default_factory=list)
    unit: int = 1
    # Every conv whose output channels are the group's (``producers[0] == producer``): one for a
    # plain group, one per BatchNorm summed into a residual stream with ``residual_streams=True``.
    producers: list[str] = field(default_factory=list)
    # A residual stream's nodes (its BatchNorms, sums, ops walked back through): empty unless the
    # group couples a residual addition or stacks paths; used to fold removed channels' constants
    # through the sums.
    stream: list[fx.Node] = field(default_factory=list, repr=False, compare=False)
    # Selective-kernel attention convs whose outputs are ``paths`` blocks of the group's channels
    # (output ``m * channels + c`` weighs path ``m``'s channel ``c``): ``{conv: paths}``, each
    # sliced on every block (see :mod:`rnip_ext.pruning.selective`).
    selects: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.producers and self.producer:
            self.producers = [self.producer]

    @property
    def name(self) -> str:
        """The group's name: its first BatchNorm."""
        return self.bns[0]

    @property
    def residual(self) -> bool:
        """Whether the group is a residual stream (its BatchNorms' outputs are summed together)."""
        return any(_is_add(n) for n in self.stream)

    @property
    def stacked(self) -> bool:
        """Whether the group's channels come from parallel paths stacked and summed (a selective
        kernel block: each path's BatchNorm is one of the group's)."""
        return any(n.op == "call_function" and n.target in STACK_TARGETS for n in self.stream)

    @property
    def summed(self) -> bool:
        """Whether the group's BatchNorms are summed (a residual stream, stacked paths) rather than
        chained: a channel is silent only when it has receded in every one of them."""
        return self.residual or self.stacked

    @property
    def additions(self) -> list[str]:
        """The graph nodes of the residual additions the group couples (empty for a plain group)."""
        return [n.name for n in self.stream if _is_add(n)]

    def modules(self) -> list[str]:
        """Every module the group slices: producers, BatchNorms, channel-wise convs, gates,
        consumers (each once: a RepVGG conv reads a stream and writes into the same stream)."""
        names = [*self.producers, *self.bns, *self.depthwise, *self.gates, *self.selects,
                 *(c.name for c in self.consumers)]
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Blocker:
    """Why the BatchNorm ``bn`` is not prunable: ``construct`` (e.g. ``"residual addition"``) at ``where``."""

    bn: str
    construct: str
    where: str

    def __str__(self) -> str:
        return f"{self.bn}: {self.construct} at {self.where}"


class _Tracer(fx.Tracer):
    """Keeps BatchNorms (ours included) as leaves and remembers where tracing failed."""

    def __init__(self, autowrap_functions: tuple = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BoundedBatchNorm2d) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.stack[-1]  # the innermost module
            raise
        finally:
            self.stack.pop()


class _PruningTracer(_Tracer):
    """Also keeps every layer with a handler (subclasses of Conv2d/Linear/BatchNorm2d: timm's
    ``Linear``, ``Conv2dSame``, ``BatchNormAct2d``), per-sample drop modules (timm's ``DropPath``,
    torchvision's ``StochasticDepth``) and the modules in ``opaque`` as leaves, and records the
    per-sample drop functions as calls (see :data:`DROP_PATH_FUNCTIONS`)."""

    def __init__(self, opaque: set[str]) -> None:
        super().__init__(autowrap_functions=drop_path_functions())
        self.opaque = opaque
        self.drops = drop_path_modules()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.opaque or handler_for(m) is not None or is_norm_act(m)
                or isinstance(m, self.drops) or super().is_leaf_module(m, qualname))


def _trace_error(model: nn.Module, where: str | None, exc: Exception) -> PruningTraceError:
    where = where or type(model).__name__
    return PruningTraceError(
        f"torch.fx could not trace module '{where}' of {type(model).__name__} "
        f"({type(exc).__name__}: {exc}). rnip_ext.pruning needs a traceable model (no "
        "data-dependent control flow); for other architectures use the Torch-Pruning "
        "integration: rnip_ext.integrations.torch_pruning"
    )


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` with BatchNorms as leaves; clear error when impossible."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean the same to the user
        raise _trace_error(model, tracer.failed_in, exc) from exc
    return fx.GraphModule(model, graph)


MAX_OPAQUE = 64


@dataclass
class Traced:
    """A traced graph of ``model`` (its nodes' targets name ``model``'s submodules). No
    ``fx.GraphModule`` is built: the analysis reads the graph only, and generating a
    GraphModule's code costs as much as a small network's whole analysis."""

    model: nn.Module
    graph: fx.Graph


def trace_for_pruning(model: nn.Module) -> tuple[Traced, dict[str, str]]:
    """A trace with every handled layer as a leaf. A submodule fx cannot trace through is kept
    whole as an opaque leaf (its channels cannot be pruned, its layers still count), and the
    trace is retried; ``{opaque module: why}`` comes back with the graph. Raises
    :class:`PruningTraceError` when the model's own forward cannot be traced."""
    opaque: dict[str, str] = {}
    while True:
        tracer = _PruningTracer(set(opaque))
        try:
            graph = tracer.trace(model)
            return Traced(model, graph), opaque
        except Exception as exc:  # fx raises many types; all mean the same to the user
            where = tracer.failed_in
            if not where or where in opaque or where == type(model).__name__ or len(opaque) >= MAX_OPAQUE:
                raise _trace_error(model, where, exc) from exc
            opaque[where] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.dim()``, ``x.shape[0]``: reads metadata, never channel values."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return _is_shape_query(node.args[0])
    return False


def _other_node_args(node: fx.Node, source: fx.Node) -> bool:
    """Does ``node`` read any graph value besides ``source`` (shape queries aside)?"""
    found = []
    fx.node.map_arg(
        (node.args, node.kwargs),
        lambda n: found.append(n) if n is not source and not _is_shape_query(n) else None,
    )
    return bool(found)


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class _Analysis:
    def __init__(self, model: nn.Module, gm: Traced, opaque: dict[str, str] | None = None,
                 residual_streams: bool = False) -> None:
        self.model = model
        self.streams = residual_streams
        # Blocking nodes whose construct the stream walk names itself (a BatchNorm reading a stream).
        self.notes: dict[fx.Node, str] = {}
        self.modules = dict(model.named_modules())
        self.opaque = opaque or {}
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        self.gm = gm
        self.unit: dict[str, int] = {}
        # A concatenation whose output reaches something no group passes: what that is (named
        # in the blocker: "concatenation into module BatchNorm2d").
        self.after_cat: dict[fx.Node, fx.Node] = {}
        self.drop_modules = drop_path_modules()
        self.drop_functions = drop_path_functions()

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op == "call_module" and self.calls.get(node.target) == 1:
            return self.modules[node.target]
        return None

    def kind(self, node: fx.Node) -> str:
        """Classify a node by what it does to channels."""
        if node.op == "call_module":
            m = self.modules[node.target]
            # Stateless modules may be reused (one ReLU called twice in a block) ...
            if isinstance(m, POINTWISE_MODULES + self.drop_modules) and not any(True for _ in m.parameters()):
                return "pointwise"
            if isinstance(m, POOL_MODULES):
                return "pool"
            if isinstance(m, nn.Flatten):
                return "flatten" if m.start_dim == 1 and m.end_dim == -1 else "other"
            if self.module(node) is None:
                return "other"  # ... but slicing a layer called twice would break its other call
            handler = handler_for(m)
            role = handler.role(m) if handler is not None else None
            if role == "norm":
                return "bn"
            if role == "channelwise":
                return "depthwise"
            return role or "other"
        if node.op == "call_function":
            if node.target in POINTWISE_FUNCTIONS or node.target in self.drop_functions:
                return "pointwise"
            if node.target in POOL_FUNCTIONS:
                return "pool"
            if node.target is torch.flatten:
                return "flatten" if self._flattens_from_channels(node) else "other"
            if node.target is operator.getitem:
                return "pointwise" if self._whole_slice(node) else "other"
            if node.target in MUL_TARGETS:
                return "mul"
            if node.target in CAT_TARGETS:
                return "cat"
            if node.target in STACK_TARGETS:
                return "stack"
            if node.target in ADD_TARGETS:
                return "add"
        if node.op == "call_method":
            if node.target in POINTWISE_METHODS:
                return "pointwise"
            if node.target in FLATTEN_METHODS:
                return "flatten" if self._flattens_from_channels(node) else "other"
            if node.target == "mean" and self._spatial_mean(node):
                return "pool"
            if node.target in MUL_TARGETS:
                return "mul"
            if node.target in ADD_TARGETS:
                return "add"
        return "other"

    @staticmethod
    def _whole_slice(node: fx.Node) -> bool:
        """``x[:, :k]`` that keeps all of ``x`` (timm GhostNet's ``out[:, :out_chs]`` when the
        concatenation is exactly ``out_chs`` wide): the same tensor, judged from the recorded shapes."""
        src, index = node.args if len(node.args) == 2 else (None, None)
        if not isinstance(src, fx.Node) or not isinstance(index, tuple) or not all(isinstance(i, slice) for i in index):
            return False
        if any(not (i.start is None or i.start == 0) or not (i.step is None or i.step == 1) for i in index):
            return False
        before = _shape(src)
        return before is not None and len(before) == 4 and before == _shape(node)

    @staticmethod
    def _spatial_mean(node: fx.Node) -> bool:
        """``x.mean((2, 3), keepdim=True)``: a global average pool (squeeze-and-excitation)."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        return keep is True and sorted(d % 4 if isinstance(d, int) else d for d in dims) == [2, 3]

    def _flattens_from_channels(self, node: fx.Node) -> bool:
        """``(N, C, H, W) -> (N, C*H*W)``: the only reshape that keeps channel blocks intact."""
        if node.op in ("call_method", "call_function") and node.target in ("flatten", torch.flatten):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start == 1 and end == -1:
                return True
        before, after = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None, _shape(node)
        return (
            before is not None and after is not None and len(before) == 4 and len(after) == 2
            and after[0] == before[0] and after[1] == before[1] * before[2] * before[3]
        )

    def feeds_norm(self, conv_name: str) -> bool:
        """Does the conv ``conv_name`` output straight (and only) into a BatchNorm?"""
        node = next(n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == conv_name)
        if len(node.users) != 1:
            return False
        (user,) = node.users
        norm = self.module(user)
        return isinstance(norm, (BoundedBatchNorm2d, nn.modules.batchnorm._BatchNorm)) and user.args == (node,)

    def producer(self, bn_node: fx.Node) -> tuple[str, fx.Node] | None:
        """The conv feeding ``bn_node`` alone: ``("conv" | "depthwise", node)``, or None."""
        src = bn_node.args[0] if bn_node.args else None
        if not isinstance(src, fx.Node) or len(src.users) != 1 or len(bn_node.args) != 1:
            return None
        kind = self.kind(src)
        return (kind, src) if kind in ("conv", "depthwise") else None

    def describe(self, node: fx.Node, after: bool = True) -> str:
        """What a blocking node is, in words (for a concatenation, with ``after``: what it feeds
        that no group passes)."""
        if node in self.notes:
            return self.notes[node]
        if node.op == "output":
            return "the network's output"
        if node.op == "placeholder" and self.streams:
            return "the network's input"
        if node.target is F.pad and self.streams:
            return "zero padding (F.pad, e.g. an option-A shortcut)"
        if node.op == "call_module":
            m = self.modules[node.target]
            if node.target in self.opaque:
                return f"module fx cannot trace ({type(m).__name__}, {self.opaque[node.target]})"
            if self.calls.get(node.target, 0) > 1:
                return f"module called {self.calls[node.target]} times ({type(m).__name__})"
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                if m.in_channels == m.out_channels:
                    return f"depthwise/grouped convolution not followed by its own BatchNorm ({type(m).__name__})"
                return f"grouped convolution with in != out channels ({type(m).__name__})"
            return f"module {type(m).__name__}"
        if node.target in ADD_TARGETS or node.target in (operator.sub, torch.sub, "sub"):
            return "residual addition"
        if node.target in CAT_TARGETS:
            inner = self.after_cat.get(node) if after else None
            if inner is None:
                return "concatenation"
            m = self.modules.get(inner.target) if inner.op == "call_module" else None
            if isinstance(m, nn.Conv2d) and m.groups > 1 and self.calls.get(inner.target, 0) == 1:
                what = f"a grouped convolution ({type(m).__name__})"
            elif m is not None and inner.target not in self.opaque and self.calls.get(inner.target, 0) == 1:
                what = f"module {type(m).__name__}"
            else:
                what = self.describe(inner)
            return f"concatenation into {what}"
        if node.target in MUL_TARGETS:
            return "multiplication by a tensor that is not a channel-wise gate"
        if node.target in FLATTEN_METHODS or node.target is torch.flatten:
            return "reshape that mixes channels"
        if node.target is operator.getitem:
            return "indexing / split"
        if self.feeds_channel_conv1d(node):
            return ("channel-mixing gate (a Conv1d across the channels, as in ECA: each gate value "
                    "mixes neighbouring channels, so no channel can go without changing the others)")
        return f"{_target_name(node)}"

    def feeds_channel_conv1d(self, node: fx.Node, depth: int = 4) -> bool:
        """Does ``node`` reach a ``Conv1d`` through reshapes only (ECA's ``mean -> view(N, 1, C)
        -> conv1d``, which convolves along the channels)?"""
        for user in node.users:
            if user.op == "call_module" and isinstance(self.modules.get(user.target), nn.Conv1d):
                return True
            if (depth > 0 and user.op in ("call_method", "call_function")
                    and _target_name(user) in RESHAPES and self.feeds_channel_conv1d(user, depth - 1)):
                return True
        return False

    def gate_conv(self, gate: fx.Node, channels: int) -> str | None:
        """The conv whose output, through elementwise ops only, is ``gate`` of shape (N, C, 1, 1)."""
        shape = _shape(gate)
        if shape is None or len(shape) != 4 or shape[1] != channels or shape[2:] != (1, 1):
            return None
        node = gate
        while True:
            if len(node.users) != 1:
                return None
            kind = self.kind(node)
            if kind == "conv":
                conv = self.modules[node.target]
                return node.target if conv.out_channels == channels else None
            if kind != "pointwise" or not isinstance(node.args[0], fx.Node) or _other_node_args(node, node.args[0]):
                return None
            node = node.args[0]

    def cat_offsets(self, cat: fx.Node, start: fx.Node) -> list[int] | None:
        """Where ``start``'s channels begin in the output of the concatenation ``cat``: one offset
        per time it is listed (the channel counts of the inputs before it, summed, from the
        recorded shapes). ``None`` unless ``cat`` joins 4-D tensors along the channel dimension
        (``dim=1`` or ``-3``) and every input's shape is known (it needs example inputs)."""
        tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", cat.kwargs.get("axis", 0))
        shape = _shape(cat)
        if (not isinstance(tensors, (list, tuple)) or shape is None or len(shape) != 4
                or not isinstance(dim, int) or dim % 4 != 1):
            return None
        offsets, at = [], 0
        for t in tensors:
            s = _shape(t) if isinstance(t, fx.Node) else None
            if s is None or len(s) != 4:
                return None
            if t is start:
                offsets.append(at)
            at += s[1]
        return offsets if offsets and at == shape[1] else None

    def follow(self, start: fx.Node, source: str, group: ChannelGroup, channels: int,
               path: list[fx.Node], flattened: bool, seen: set, offset: int = 0,
               catted: bool = False) -> fx.Node | None:
        """Walk forward from ``start``; fill ``group``; the node that blocks the group, or None.

        ``channels`` is the width of ``start``'s output; after a concatenation (``catted``) the
        group's channels are ``offset ... offset + group.channels - 1`` of it, and only
        pointwise ops, pooling, flattening, further concatenations and the consumers (convs
        with ``groups=1``, linear layers) may follow.
        """
        if not start.users:
            return start  # the graph's output
        for user in start.users:
            if user in seen or _is_shape_query(user):
                continue
            kind = self.kind(user)
            if kind in ("pointwise", "pool", "flatten"):
                if _other_node_args(user, start) or (kind != "pointwise" and flattened):
                    return user
                seen.add(user)
                blocker = self.follow(user, source, group, channels, path + [user],
                                      flattened or kind == "flatten", seen, offset, catted)
                if blocker is not None:
                    return blocker
            elif kind == "cat" and not flattened:
                offsets = self.cat_offsets(user, start)
                if offsets is None:
                    return user
                for at in offsets:
                    # Each place the tensor is listed is its own channel range: walk on from
                    # each with its offset (the nodes after the cat are visited once per range,
                    # hence a copy of ``seen``).
                    blocker = self.follow(user, source, group, _shape(user)[1], path + [user], False,
                                          seen | {user}, offset + at, True)
                    if blocker is not None:
                        if blocker is not user:
                            self.after_cat.setdefault(user, blocker)
                        return user
            elif kind == "mul" and not flattened and not catted:
                others = [a for a in user.args if isinstance(a, fx.Node) and a is not start]
                gate = self.gate_conv(others[0], channels) if len(others) == 1 and not user.kwargs else None
                if gate is None or gate in group.gates:
                    return user
                user.meta["rnip_gate"] = True
                group.gates.append(gate)
                seen.add(user)
                blocker = self.follow(user, source, group, channels, path + [user], False, seen)
                if blocker is not None:
                    return blocker
            elif kind == "conv" and not flattened and not _other_node_args(user, start):
                group.consumers.append(Consumer(user.target, "conv", 1, source, path, offset,
                                                channels if catted else None))
            elif kind == "linear" and not _other_node_args(user, start):
                lin = self.modules[user.target]
                if flattened and lin.in_features % channels == 0:
                    block = lin.in_features // channels
                elif not flattened and _shape(start) is not None and len(_shape(start)) == 2:
                    block = 1  # (N, C) straight into the linear layer
                else:
                    return user
                group.consumers.append(Consumer(user.target, "linear", block, source, path, offset,
                                                channels if catted else None))
            elif kind == "depthwise" and not flattened and not catted and not _other_node_args(user, start):
                dw = self.modules[user.target]
                (bn_user,) = user.users if len(user.users) == 1 else (None,)
                if dw.in_channels != channels:
                    return user
                if (bn_user is None or self.kind(bn_user) != "bn") and dw.groups == channels:
                    # A separable conv (depthwise, then straight on): the depthwise filter goes
                    # with the channel, and the walk goes on through it.
                    group.depthwise.append(user.target)
                    seen.add(user)
                    blocker = self.follow(user, source, group, channels, path + [user], False, seen)
                    if blocker is not None:
                        return blocker
                    continue
                if bn_user is None or self.kind(bn_user) != "bn":
                    return user
                if self.modules[bn_user.target].num_features != channels or len(bn_user.args) != 1:
                    return bn_user
                group.depthwise.append(user.target)
                group.unit = math.lcm(group.unit, handler_for(dw).unit(dw))
                group.bns.append(bn_user.target)
                seen.update((user, bn_user))
                blocker = self.follow(bn_user, bn_user.target, group, channels, [], False, seen)
                if blocker is not None:
                    return blocker
            elif kind == "stack" and not flattened and not catted:
                from .selective import join_stack  # late: selective builds on this module

                blocker = join_stack(self, user, start, source, group, channels, path, seen)
                if blocker is not None:
                    return blocker
            elif kind == "add" and self.streams and not flattened and not catted:
                blocker = self.join_sum(user, group, channels, seen)
                if blocker is not None:
                    return blocker
            elif kind == "bn" and self.streams and not flattened and not catted:
                blocker = self.join_reader(user, group, channels, seen)
                if blocker is not None:
                    return blocker
            else:
                return user
        return None

    # -- residual streams (``residual_streams=True``) ---------------------------------------------
    #
    # ``follow`` walks forward; a stream also needs walking back, from each sum to whatever is
    # summed into it: ``back`` does, and every node it joins is walked forward from too, so the
    # group ends up holding the stream's whole connected region. ``seen`` keeps each node once.

    def join_sum(self, add: fx.Node, group: ChannelGroup, channels: int, seen: set) -> fx.Node | None:
        """Couple the residual addition ``add``: each summand is walked back to the BatchNorms
        writing it, then the walk goes on forward from the sum. The blocking node, or None."""
        operands = list(add.args)
        if len(operands) != 2 or add.kwargs or not all(isinstance(a, fx.Node) for a in operands):
            return add  # torch.add(a, b, alpha=...), a sum with a scalar: not a stream
        shapes = [_shape(n) for n in (*operands, add)]
        if all(sh is not None for sh in shapes) and len(set(shapes)) != 1:
            return add  # broadcasting: the summands are not the same channels
        seen.add(add)
        group.stream.append(add)
        for operand in operands:
            blocker = self.back(operand, group, channels, seen)
            if blocker is not None:
                return blocker
        return self.follow(add, group.name, group, channels, [add], False, seen)

    def back(self, node: fx.Node, group: ChannelGroup, channels: int, seen: set) -> fx.Node | None:
        """Walk back from ``node``, summed into the stream; the blocking node, or None."""
        if node in seen:
            return None
        kind = self.kind(node)
        if kind == "bn":
            return self.join_writer(node, group, channels, seen)
        if kind == "add":
            return self.join_sum(node, group, channels, seen)
        if kind == "mul":
            return self.join_gate(node, group, channels, seen)
        if kind in ("pointwise", "pool") and node.args and isinstance(node.args[0], fx.Node) \
                and not _other_node_args(node, node.args[0]):
            seen.add(node)
            group.stream.append(node)
            blocker = self.back(node.args[0], group, channels, seen)
            if blocker is not None:
                return blocker
            return self.follow(node, group.name, group, channels, [node], False, seen)
        return node  # e.g. an option-A shortcut's zero padding, a concatenation, the network's input

    def join_writer(self, bn_node: fx.Node, group: ChannelGroup, channels: int, seen: set) -> fx.Node | None:
        """A BatchNorm summed into the stream: with its producer conv (a block's last BatchNorm, a
        projection shortcut's, the stem's), or reading the stream itself with no conv of its own
        (RepVGG's identity branch). The blocking node, or None."""
        bn = self.modules[bn_node.target]
        if bn.num_features != channels or len(bn_node.args) != 1 or bn_node.kwargs:
            return bn_node
        produced = self.producer(bn_node)
        if produced is not None and produced[0] != "conv":
            self.notes[produced[1]] = ("depthwise/grouped convolution writing into a residual stream "
                                       f"({type(self.modules[produced[1].target]).__name__})")
            return produced[1]
        if produced is not None and self.modules[produced[1].target].out_channels != channels:
            return produced[1]
        seen.add(bn_node)
        group.bns.append(bn_node.target)
        group.stream.append(bn_node)
        if produced is not None:
            group.producers.append(produced[1].target)
        else:
            src = bn_node.args[0]
            if not isinstance(src, fx.Node):
                return bn_node
            if not self.summed_back(bn_node):
                return src  # not a stream's identity branch: "no conv of its own before it", as by default
            blocker = self.back(src, group, channels, seen)  # it must read the stream
            if blocker is not None:
                return blocker
        return self.follow(bn_node, bn_node.target, group, channels, [], False, seen)

    def summed_back(self, bn_node: fx.Node) -> bool:
        """Is the output of ``bn_node`` (a BatchNorm with no conv of its own), through elementwise
        ops only, summed into a stream?"""
        node = bn_node
        while len(node.users) == 1:
            (user,) = node.users
            if self.kind(user) == "add":
                return True
            if self.kind(user) != "pointwise" or _other_node_args(user, node):
                break
            node = user
        return False

    def join_reader(self, bn_node: fx.Node, group: ChannelGroup, channels: int, seen: set) -> fx.Node | None:
        """A BatchNorm reached forward from the stream: joined when it has no conv of its own and
        its output, through elementwise ops only, is summed back into a stream (RepVGG's identity
        branch); any other BatchNorm after an addition blocks (a pre-activation block's)."""
        bn = self.modules[bn_node.target]
        if bn.num_features != channels or len(bn_node.args) != 1 or bn_node.kwargs:
            return bn_node
        if not self.summed_back(bn_node):
            if group.residual:  # else it is what the default analysis reports: a BatchNorm on the way
                self.notes[bn_node] = (f"BatchNorm after a residual addition ({type(bn).__name__}), "
                                       "not summed back into it")
            return bn_node
        seen.add(bn_node)
        group.bns.append(bn_node.target)
        group.stream.append(bn_node)
        return self.follow(bn_node, bn_node.target, group, channels, [], False, seen)

    def join_gate(self, mul: fx.Node, group: ChannelGroup, channels: int, seen: set) -> fx.Node | None:
        """``x * gate(x)`` summed into the stream (squeeze-and-excitation before the addition): the
        gate conv joins the group, ``x`` is walked back. The blocking node, or None."""
        args = list(mul.args)
        if len(args) != 2 or mul.kwargs or not all(isinstance(a, fx.Node) for a in args):
            return mul
        for data, gate in ((args[0], args[1]), (args[1], args[0])):
            conv = self.gate_conv(gate, channels)
            if conv is not None and conv not in group.gates:
                break
        else:
            return mul
        mul.meta["rnip_gate"] = True
        group.gates.append(conv)
        seen.add(mul)
        group.stream.append(mul)
        blocker = self.back(data, group, channels, seen)
        if blocker is not None:
            return blocker
        return self.follow(mul, group.name, group, channels, [mul], False, seen)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every submodule in eval mode for the block, each one's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, training in modes:
            m.training = training


def find_channel_groups(model: nn.Module, example_inputs=None, *, residual_streams: bool = False) -> list[ChannelGroup]:
    """Every prunable channel group of ``model``, in graph order.

    ``example_inputs`` (a tensor or a tuple of tensors), when given, runs a shape propagation so
    that ``view``/``reshape`` calls that flatten ``(N, C, H, W)`` into ``(N, C*H*W)`` and
    channel-wise gates are recognised too; ``flatten(1)`` and ``nn.Flatten`` are recognised
    without it. ``residual_streams=True`` couples each residual stream into one group instead
    of leaving it whole (see the module docstring). The analysis is cached per model (see
    :func:`rnip_ext.pruning.channel_graph`).
    """
    from .channels import channel_graph

    return channel_graph(model, example_inputs, residual_streams=residual_streams).groups


def _shapes(inputs) -> str:
    return ", ".join(f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
                     for x in inputs)


def _check_example_inputs(model: nn.Module, inputs) -> None:
    """Floating-point tensors; whether their shapes fit is found by running the model on them."""
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError(f"example_inputs must be a tensor or a tuple of tensors, got {_shapes(inputs) or 'nothing'}")
    if not all(x.is_floating_point() for x in inputs):
        raise ValueError(f"example_inputs do not fit {type(model).__name__}: expected floating-point tensors, "
                         f"got {_shapes(inputs)}")


@dataclass(frozen=True)
class TensorShape:
    """A node's output shape, stored as ``node.meta["tensor_meta"]`` (tensor outputs only)."""

    shape: tuple


def _run_recording_shapes(traced: Traced, inputs) -> None:
    """Run the graph on ``inputs`` and store every tensor-valued node's shape in its meta.

    A plain loop over the nodes: ``fx.Interpreter``/``ShapeProp`` need a GraphModule and add a
    context manager, a metadata walk and a graph dump per node, most of the analysis time of a
    small network. Values are dropped after their last use, as the interpreter does."""
    nodes = list(traced.graph.nodes)
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        fx.node.map_arg((node.args, node.kwargs), lambda n, i=i: last_use.__setitem__(n, i))
    dead: dict[int, list[fx.Node]] = {}
    for node, i in last_use.items():
        dead.setdefault(i, []).append(node)
    root = traced.model
    env: dict[fx.Node, object] = {}
    given = iter(inputs)
    for i, node in enumerate(nodes):
        op = node.op
        if op == "output":
            break
        if op == "placeholder":
            if str(node.target).startswith("*"):
                value = list(given)
            else:
                value = next(given, node.args[0] if node.args else None)
        elif op == "get_attr":
            value = root
            for part in str(node.target).split("."):
                value = getattr(value, part)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if op == "call_module":
                value = root.get_submodule(node.target)(*args, **kwargs)
            elif op == "call_function":
                value = node.target(*args, **kwargs)
            else:  # call_method
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
        env[node] = value
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = TensorShape(tuple(value.shape))
        for gone in dead.get(i, ()):
            del env[gone]


def propagate_shapes(model: nn.Module, traced: Traced, example_inputs) -> None:
    """Run the traced graph once on ``example_inputs`` (eval mode, no grad) to record every
    node's output shape."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    _check_example_inputs(model, inputs)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    required = sum(1 for n in placeholders if not n.args)
    if not required <= len(inputs) <= len(placeholders):
        raise ValueError(f"example_inputs do not fit {type(model).__name__}: its forward takes "
                         f"{required}{'' if required == len(placeholders) else f' to {len(placeholders)}'} "
                         f"input(s), got {len(inputs)} ({_shapes(inputs)})")
    try:
        with eval_mode(model), torch.no_grad():
            _run_recording_shapes(traced, inputs)
    except Exception as exc:  # the model's own error, whatever its type, means the same here
        cause = exc.__cause__ or exc
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ValueError(
            f"example_inputs do not fit {type(model).__name__}, or its forward fails on them: got "
            f"{_shapes(inputs)} ({type(cause).__name__}: {detail})"
        ) from exc


def check_residual_streams(residual_streams) -> bool:
    """``residual_streams`` must be a bool (it keys the graph cache)."""
    if not isinstance(residual_streams, bool):
        raise TypeError(f"residual_streams must be a bool, got {type(residual_streams).__name__}")
    return residual_streams


def _unclaimed_bns(analysis: _Analysis, gm: Traced, claimed: set[str], blockers: list[Blocker]):
    """The BatchNorm nodes not yet in a group, in graph order (``claimed`` is read as the walk
    goes); a prunable BatchNorm the analysis cannot see into (a module called twice, an opaque
    one) is recorded in ``blockers`` instead."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in claimed:
            continue
        if analysis.kind(node) == "bn":
            yield node
        elif node.op == "call_module" and analysis.module(node) is None \
                and is_prunable_bn(analysis.modules[node.target]):
            blockers.append(Blocker(node.target, analysis.describe(node), node.target))


def groups_of(model: nn.Module, gm: Traced, opaque: dict[str, str] | None = None,
              residual_streams: bool = False) -> tuple[list[ChannelGroup], list[Blocker]]:
    """The channel groups of a traced (and possibly shape-propagated) model, and for every
    BatchNorm left out, what blocks it. ``residual_streams``: couple residual streams (see the
    module docstring) instead of blocking at their additions."""
    analysis = _Analysis(model, gm, opaque, check_residual_streams(residual_streams))
    if residual_streams:
        return _stream_groups(analysis, gm)
    groups: list[ChannelGroup] = []
    blockers: list[Blocker] = []
    claimed: set[str] = set()
    for node in _unclaimed_bns(analysis, gm, claimed, blockers):
        produced = analysis.producer(node)
        if produced is None or produced[0] != "conv":
            if produced is None:
                src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
                what = (f"no conv of its own before it ({analysis.describe(src, after=False)})" if src is not None
                        else "no conv of its own before it")
                blockers.append(Blocker(node.target, what, src.name if src is not None else node.target))
            continue  # a BN after a depthwise conv belongs to the group of the BN before it
        bn = analysis.modules[node.target]
        conv = analysis.modules[produced[1].target]
        if conv.out_channels != bn.num_features:
            continue
        group = ChannelGroup([node.target], produced[1].target, bn.num_features)
        blocker = analysis.follow(node, node.target, group, bn.num_features, [], False, {node})
        if blocker is None:
            # Through a concatenation the group is one part of the consumer's input: scaling it
            # alone changes the mix the next BatchNorm sees, so that is no renormalisation.
            group.renormalised = bool(group.consumers) and all(
                c.kind == "conv" and c.width is None and analysis.feeds_norm(c.name) for c in group.consumers)
            groups.append(group)
            claimed.update(group.bns)
        else:
            where = blocker.target if blocker.op == "call_module" else blocker.name
            blockers.append(Blocker(node.target, analysis.describe(blocker), str(where)))
    return groups, blockers


def _stream_groups(analysis: _Analysis, gm: Traced) -> tuple[list[ChannelGroup], list[Blocker]]:
    """:func:`groups_of` with residual streams coupled: the walk from each unclaimed BatchNorm
    (in graph order) also joins sums and walks back from them. A group that reaches no sum is
    exactly the group the default analysis finds."""
    groups: list[ChannelGroup] = []
    blockers: list[Blocker] = []
    claimed: set[str] = set()
    for node in _unclaimed_bns(analysis, gm, claimed, blockers):
        produced = analysis.producer(node)
        if produced is not None and produced[0] != "conv":
            continue  # a BN after a depthwise conv belongs to the group of the BN before it
        bn = analysis.modules[node.target]
        if produced is not None and analysis.modules[produced[1].target].out_channels != bn.num_features:
            continue
        group = ChannelGroup([], "", bn.num_features)  # the walk fills BatchNorms and producers
        blocker = analysis.join_writer(node, group, bn.num_features, set())
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if blocker is None and group.producers:
            group.producer = group.producers[0]
            if not group.summed:
                group.stream = []  # a plain group: as the default analysis has it
            group.renormalised = bool(group.consumers) and all(
                c.kind == "conv" and analysis.feeds_norm(c.name) for c in group.consumers)
            groups.append(group)
            claimed.update(group.bns)
        elif produced is None and (blocker is None or blocker is src):
            what = (f"no conv of its own before it ({analysis.describe(src)})" if src is not None
                    else "no conv of its own before it")
            blockers.append(Blocker(node.target, what, src.name if src is not None else node.target))
        else:
            where = blocker.target if blocker.op == "call_module" else blocker.name
            blockers.append(Blocker(node.target, analysis.describe(blocker), str(where)))
    return groups, blockers


def analyse(model: nn.Module, example_inputs=None,
            residual_streams: bool = False) -> tuple[list[ChannelGroup], Traced]:
    """The channel groups and a fresh traced graph (with output shapes when ``example_inputs`` is given)."""
    gm, opaque = trace_for_pruning(model)
    if example_inputs is not None:
        propagate_shapes(model, gm, example_inputs)
    return groups_of(model, gm, opaque, residual_streams)[0], gm
