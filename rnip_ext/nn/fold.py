r"""Where a trained BatchNorm's scale and sign can go: the exact fold behind ``convert_batchnorm``.

A plain BatchNorm computes ``gamma * xhat + beta``; a bounded one ``sigmoid(w) * xhat + b`` with
``0 < sigmoid(w) < 1``. Per layer, with a constant ``c > max |gamma|``::

    gamma * xhat + beta  =  c * ( (|gamma| / c) * (sign(gamma) * xhat) + beta / c )

* ``sign(gamma)`` moves into the convolution producing the BatchNorm's input (its output channel's
  weights and bias, and the running mean): ``xhat`` of ``-x`` is ``-xhat`` in eval mode and with
  batch statistics alike.
* ``w = logit(|gamma| / c)``, ``b = beta / c``.
* ``c`` multiplies the layer's output. Every operation up to the next convolution or linear
  layer must be positively homogeneous (``f(c x) = c f(x)``: ReLU, pooling, reshapes, dropout,
  residual additions, concatenations...), so ``c`` reaches that layer's input and is multiplied
  into its weight. Clamps (``ReLU6``, ``Hardtanh``) pass ``c`` when their bounds are divided by it.
  A BatchNorm reached by ``c`` absorbs it exactly: running mean ``/ c``, running variance and
  ``eps`` ``/ c^2``.

Every tensor of the ``torch.fx`` graph (traced in training and in eval mode) gets an unknown
factor; the rules above tie factors together (union-find) or pin them to 1 (the model's input and
output, SiLU, sigmoid, anything unknown). BatchNorms whose outputs meet (a residual stream) share
one ``c``. A BatchNorm whose factor is pinned to 1 keeps its function only with ``|gamma| < 1``.
"""

from __future__ import annotations

import contextlib
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .norm_act import is_norm_act

__all__ = ["Fold", "LayerFold", "plan_fold", "apply_fold", "smallest_scale"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Linear in their input and in (weight, bias): an input factor k_in and an output factor k_out
# fold into W * k_in / k_out and b / k_out.
_LINEAR_MODULES = (*_CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
# Odd and positively homogeneous per channel: a sign or a factor passes through unchanged.
_ODD_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_ODD_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
}  # fmt: skip
# Positively homogeneous (f(c x) = c f(x) for c > 0) in their one tensor input.
_HOMOGENEOUS_MODULES = (
    *_ODD_MODULES, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle,
)  # fmt: skip
# hardtanh(c x; lo, hi) = c hardtanh(x; lo / c, hi / c): passes c once its bounds are divided.
_CLAMP_MODULES = (nn.ReLU6, nn.Hardtanh)
_HOMOGENEOUS_FUNCTIONS = _ODD_FUNCTIONS | {
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_, F.prelu, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.interpolate, F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle, F.pad, torch.flatten,
    torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.narrow,
    torch.roll, torch.flip, torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.mean,
    torch.sum, torch.neg, operator.neg, operator.getitem, torch.clone,
}  # fmt: skip
_HOMOGENEOUS_METHODS = {
    "relu", "relu_", "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous",
    "squeeze", "unsqueeze", "expand", "repeat", "narrow", "flip", "roll", "clone", "chunk", "split",
    "tensor_split", "unbind", "mean", "sum", "neg", "float", "double", "half", "bfloat16", "detach",
    "__getitem__",
}  # fmt: skip
# Methods whose further tensor arguments are read for their shape or dtype only.
_LIKE_METHODS = {"to", "type_as", "view_as", "reshape_as", "expand_as"}
_SUMS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, "add", "add_", "sub", "sub_"}
_CATS = {torch.cat, torch.concat, torch.concatenate, torch.stack}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_QUOTIENTS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_"}
_CLAMPS = {torch.clamp, torch.clip, torch.clamp_min, "clamp", "clamp_", "clip", "clamp_min", "clamp_min_"}
_META_METHODS = {"size", "dim", "numel", "stride", "element_size", "is_contiguous", "get_device"}
_META_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}


def smallest_scale(dtype: torch.dtype) -> float:
    """The floor of ``|gamma| / c`` (zero gammas have no finite logit): ``finfo(dtype).eps ** 2``,
    a contribution below the rounding of any output it adds to."""
    return torch.finfo(dtype).eps ** 2


@dataclass
class LayerFold:
    """What one converted BatchNorm becomes: ``w = logit(|gamma| / c)``, ``b = beta / c``; an input
    factor ``k`` (running mean ``/ k``, running variance and ``eps`` ``/ k^2``); ``gain`` (mode
    ``"eval"`` only) moved into the running variance instead of downstream; ``negated``: the
    channels whose sign moved into ``producer``."""

    c: float = 1.0
    k: float = 1.0
    gain: float = 1.0
    negated: Tensor | None = None
    producer: str | None = None


@dataclass
class Fold:
    """Everything :func:`apply_fold` changes: the BatchNorms, ``(k_in, k_out)`` per convolution or
    linear layer, and the factor of each clamp module (by its qualified name)."""

    layers: dict[str, LayerFold] = field(default_factory=dict)
    linears: dict[str, tuple[float, float]] = field(default_factory=dict)
    clamps: dict[str, float] = field(default_factory=dict)


class _UnionFind:
    """Factor classes; a pinned class (factor 1) remembers what pinned it."""

    def __init__(self) -> None:
        self.parent: dict = {}
        self.pins: dict = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.pins:
                self.pins[ra] = self.pins.get(ra, []) + self.pins.pop(rb)

    def pin(self, key, reason: str) -> None:
        root = self.find(key)
        self.pins.setdefault(root, [])
        if reason not in self.pins[root]:
            self.pins[root].append(reason)

    def pinned(self, key) -> list[str] | None:
        return self.pins.get(self.find(key))


@contextlib.contextmanager
def _all_in_mode(model: nn.Module, training: bool):
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        yield
    finally:
        for m, was in modes:
            m.training = was


def _plain_module(m: nn.Module) -> bool:
    """No hooks or parametrisations that would change what the module does with its parameters."""
    hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    return not any(hooks) and not parametrize.is_parametrized(m)


def _module_rule(m: nn.Module) -> str | None:
    """``"linear"``, ``"homogeneous"``, ``"clamp"`` or None (pins its input and output to 1)."""
    if not _plain_module(m):
        return None
    kind = type(m)
    if kind in _LINEAR_MODULES:
        return "linear"
    if kind in _CLAMP_MODULES:
        return "clamp"
    if kind in _HOMOGENEOUS_MODULES:
        if getattr(m, "return_indices", False) or getattr(m, "value", 0) != 0:
            return None
        return "homogeneous"
    return None


def _offsets_or_indexes(node: fx.Node) -> bool:
    """A constant padding value other than 0, or pooling indices: not homogeneous after all."""
    if node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and value not in (None, 0)
    return bool(node.kwargs.get("return_indices"))


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}() '{node.name}'"
    if node.op == "placeholder":
        return "the model's input"
    return f"{getattr(node.target, '__name__', node.target)} '{node.name}'"


def _nodes_in(value) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


class _Scales:
    """Builds the factor classes of one model from its traced graphs."""

    def __init__(self, model: nn.Module, layers: set[str], graphs: list[fx.GraphModule]) -> None:
        self.modules = dict(model.named_modules())
        self.layers = layers
        self.uf = _UnionFind()
        self.products: list[tuple] = []
        self.bn_calls: dict[str, list[tuple[int, fx.Node]]] = defaultdict(list)
        self.linears: set[str] = set()
        self.clamps: set[str] = set()
        # Parameters read directly (get_attr) or held by two modules cannot be rescaled behind
        # the other reader's back.
        self.shared = _modules_sharing_parameters(model) | {
            node.target.rpartition(".")[0] for gm in graphs for node in gm.graph.nodes if node.op == "get_attr"
        }
        self.calls: list[dict[str, int]] = []
        for gi, gm in enumerate(graphs):
            self.gi = gi
            self.calls.append(defaultdict(int))
            self.var: dict[fx.Node, bool] = {}
            for node in gm.graph.nodes:
                self.calls[gi][node.target] += node.op == "call_module"
                self._add_node(node)
        self._resolve_products()

    def key(self, node: fx.Node):
        return (self.gi, node.name)

    def pin(self, nodes, reason: str) -> None:
        for n in nodes:
            self.uf.pin(self.key(n) if isinstance(n, fx.Node) else n, reason)

    def _add_node(self, node: fx.Node) -> None:
        ins = [n for n in _nodes_in((node.args, node.kwargs)) if self.var.get(n)]
        if node.op == "placeholder":
            self.var[node] = True
            self.pin([node], "the model's input")
        elif node.op == "output":
            self.pin(ins, "the model's output")
        elif node.op == "get_attr":
            self.var[node] = False
        elif node.op == "call_module":
            self.var[node] = True
            self._add_module_call(node, ins)
        else:
            self.var[node] = bool(ins) and not self._is_metadata(node)
            if self.var[node]:
                self._add_operation(node, ins)

    def _is_metadata(self, node: fx.Node) -> bool:
        """``x.size()``, ``x.shape``, ``x.dtype``...: reads no value of ``x``."""
        if node.op == "call_method":
            return node.target in _META_METHODS
        return node.target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRIBUTES

    def _first(self, node: fx.Node) -> fx.Node | None:
        arg = node.args[0] if node.args else None
        return arg if isinstance(arg, fx.Node) and self.var.get(arg) else None

    def _add_operation(self, node: fx.Node, ins: list[fx.Node]) -> None:
        target = node.target
        first = self._first(node)
        reason = _describe(node, self.modules)
        homogeneous = _HOMOGENEOUS_FUNCTIONS if node.op == "call_function" else _HOMOGENEOUS_METHODS
        kwargs = node.kwargs
        if target in homogeneous or (node.op == "call_method" and target in _LIKE_METHODS):
            like = node.op == "call_method" and target in _LIKE_METHODS
            if first is not None and (like or ins == [first]) and not _offsets_or_indexes(node):
                self.uf.union(self.key(first), self.key(node))
                self.pin([n for n in ins if n is not first and not like], reason)
                return
        elif target in _SUMS or target in _CATS:
            operands = node.args[0] if target in _CATS else node.args[:2]
            if all(isinstance(a, fx.Node) and self.var.get(a) for a in operands):
                for a in operands:
                    self.uf.union(self.key(a), self.key(node))
                return
        elif target in _PRODUCTS:
            a, b = node.args[:2]
            if len(ins) == 2 and a is not b:
                self.products.append((self.key(a), self.key(b), self.key(node), reason))
                return
            if len(ins) == 1 and not node.kwargs:
                self.uf.union(self.key(ins[0]), self.key(node))
                return
        elif target in _QUOTIENTS:
            if ins == [first] and "rounding_mode" not in kwargs:
                self.uf.union(self.key(first), self.key(node))
                return
        elif target in _CLAMPS:
            low = kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
            high = kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
            if ins == [first] and low == 0 and high is None:  # a ReLU
                self.uf.union(self.key(first), self.key(node))
                return
        self.pin(ins + [node], reason)

    def _add_module_call(self, node: fx.Node, ins: list[fx.Node]) -> None:
        name = node.target
        m = self.modules[name]
        x = node.args[0] if node.args else None
        simple = len(node.args) == 1 and not node.kwargs and isinstance(x, fx.Node) and ins == [x]
        reason = _describe(node, self.modules)
        if name in self.layers and simple:
            self.bn_calls[name].append((self.gi, node))
            self.uf.union(self.key(x), ("bn_in", name))
            out = ("bn_out", name)
            if not m.affine:
                self.uf.pin(out, f"BatchNorm '{name}' without affine parameters (scale 1)")
            rules = (_module_rule(m.drop), _module_rule(m.act)) if is_norm_act(m) else ("homogeneous",) * 2
            if rules[0] == "homogeneous" and rules[1] in ("homogeneous", "clamp"):
                self.uf.union(self.key(node), out)
                if rules[1] == "clamp":
                    self._add_clamp(f"{name}.act", out)
            else:
                culprit = "drop" if rules[0] != "homogeneous" else "act"
                why = f"{type(getattr(m, culprit)).__name__} '{name}.{culprit}'"
                self.uf.pin(out, why)
                self.pin([node], why)
            return
        rule = None if name in self.shared or not simple else _module_rule(m)
        if rule == "linear":
            self.linears.add(name)
            self.uf.union(self.key(x), ("in", name))
            self.uf.union(self.key(node), ("out", name))
        elif rule == "homogeneous":
            self.uf.union(self.key(x), self.key(node))
        elif rule == "clamp":
            self.uf.union(self.key(x), self.key(node))
            self._add_clamp(name, self.key(node))
        else:
            self.pin(ins + [node], reason)

    def _add_clamp(self, name: str, key) -> None:
        self.clamps.add(name)
        self.uf.union(("clamp", name), key)

    def _resolve_products(self) -> None:
        """``a * b`` of two scaled tensors: fine when one factor is pinned to 1 (a gate); else
        the second operand is pinned (its factor cannot be told apart from the first's)."""
        pending = list(self.products)
        while pending:
            for item in pending:
                a, b, out, _ = item
                if self.uf.pinned(b) is not None or self.uf.pinned(a) is not None:
                    self.uf.union(a if self.uf.pinned(b) is not None else b, out)
                    pending.remove(item)
                    break
            else:
                a, b, out, reason = pending.pop(0)
                self.uf.pin(b, f"{reason} (a product of two scaled tensors)")
                self.uf.union(a, out)

    def producer(self, gi: int, bn_node: fx.Node) -> tuple[str | None, str]:
        """The convolution whose output channels can carry the BatchNorm's signs, or why none."""
        src, reader = bn_node.args[0], bn_node
        while True:
            if len(src.users) != 1:
                others = ", ".join(f"'{u.target if u.op == 'call_module' else u.name}'" for u in src.users if u is not reader)
                return None, f"its input ({_describe(src, self.modules)}) is also read by {others}"
            if src.op == "call_module" and src.target in self.linears and self.calls[gi][src.target] == 1:
                m = self.modules[src.target]
                if isinstance(m, _CONVS) or (not isinstance(m, nn.Linear) and m.groups == 1):
                    return src.target, ""
            odd = (src.op == "call_module" and type(self.modules[src.target]) in _ODD_MODULES
                   and _plain_module(self.modules[src.target])) or (src.op == "call_function" and src.target in _ODD_FUNCTIONS)
            if not odd or not isinstance(src.args[0], fx.Node):
                return None, f"its input comes from {_describe(src, self.modules)}, not from a convolution"
            src, reader = src.args[0], src


def _modules_sharing_parameters(model: nn.Module) -> set[str]:
    """Modules holding a parameter that another module also holds (tied weights)."""
    owners: dict[int, list[str]] = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)].append(name)
    return {name for names in owners.values() if len(set(names)) > 1 for name in names}


def _gamma(bn: nn.Module) -> Tensor:
    return bn.weight.detach().double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)


_NEVER_CALLED = "the model's forward never calls it"


def _keep_scale(name: str, bn: nn.Module, layer: LayerFold, pins: list[str] | None, peak: float, mode: str,
                headroom: float, unknown: str) -> list[str]:
    """A layer whose output factor is pinned to 1 and whose |gamma| reaches 1: in mode ``"eval"``
    the excess goes into the running variance (``gain``); otherwise, or when the running variance
    is too small to take it (``(var + eps) / gain^2 - eps >= 0``), the reason it cannot be kept."""
    if mode == "eval" and bn.track_running_stats:
        limit = (1.0 + float(bn.running_var.double().min()) / bn.eps) ** 0.5
        if limit > peak:
            layer.gain = min(headroom * peak, limit)
            return []
        return [f"'{name}': |gamma| reaches {peak:.4g} >= 1 and its running variance is too small to "
                f"carry that scale in eval mode (at most {limit:.4g})"]
    if pins is None:  # not in any graph
        where = f"{unknown}: no later layer is known to take the part above 1"
    else:
        where = (f"its output (or a tensor it is added or concatenated to) reaches {', '.join(pins[:3])} "
                 "before any convolution or linear layer could take the part above 1 (so the bounded scale "
                 "sigmoid(w) < 1 would have to carry it alone)")
    return [f"'{name}': |gamma| reaches {peak:.4g} >= 1, and {where}"]


def _trace_both(model: nn.Module) -> tuple[list[fx.GraphModule], str | None]:
    """The model traced in training and in eval mode (branches on ``self.training`` differ), or no
    graph and why."""
    from ..pruning.graph import PruningTraceError, trace  # rnip_ext.pruning imports rnip_ext.nn

    graphs = []
    try:
        for training in (True, False):
            with _all_in_mode(model, training):
                graphs.append(trace(model))
    except PruningTraceError as exc:
        return [], f"{exc}".split(". rnip_ext.pruning needs")[0]
    return graphs, None


def plan_fold(model: nn.Module, originals: dict[str, nn.Module], *, mode: str, headroom: float) -> Fold:
    """The fold of every BatchNorm in ``originals`` (qualified name -> the plain layer), whose bounded
    replacement is already in ``model``; ``mode`` is ``"exact"`` or ``"eval"``. Raises
    ``ValueError`` listing every layer that cannot keep its function, before anything changes.

    A model ``torch.fx`` cannot trace gets no graph: every layer is then treated as feeding an
    unknown operation (``c = 1``, no sign moves), exact only where ``0 <= gamma < 1``."""
    graphs, untraceable = _trace_both(model)
    unknown = _NEVER_CALLED if untraceable is None else f"{untraceable}, so where its output goes is unknown"
    scales = _Scales(model, set(originals), graphs)
    uf = scales.uf
    fold = Fold()
    problems: list[str] = []
    # One c per class of BatchNorm outputs: headroom times the largest |gamma| in it.
    peak = {name: float(_gamma(bn).abs().max()) for name, bn in originals.items()}
    largest: dict = defaultdict(float)
    for name in originals:
        if name not in scales.bn_calls:
            uf.pin(("bn_out", name), unknown)
        largest[uf.find(("bn_out", name))] = max(largest[uf.find(("bn_out", name))], peak[name])

    def factor(key) -> float:
        root = uf.find(key)
        if uf.pinned(root) is not None or largest.get(root, 0.0) == 0.0:
            return 1.0
        return headroom * largest[root]

    for name, bn in originals.items():
        layer = fold.layers[name] = LayerFold(c=factor(("bn_out", name)), k=factor(("bn_in", name)))
        pins = uf.pinned(("bn_out", name))
        if pins is not None and peak[name] >= 1.0 and bn.affine:
            called = name in scales.bn_calls
            problems += _keep_scale(name, bn, layer, pins if called else None, peak[name], mode, headroom, unknown)
        negative = _gamma(bn) < 0
        if bool(negative.any()):
            calls = scales.bn_calls.get(name, [])
            found = {scales.producer(gi, node) for gi, node in calls} or {(None, unknown)}
            (producer, why), *more = sorted(found, key=str)
            if producer is None or more:
                problems.append(
                    f"'{name}': {int(negative.sum())} negative gamma(s) (down to {float(_gamma(bn).min()):.4g}) "
                    f"need a convolution to carry their sign, but {why or 'it is called with different inputs'}"
                )
            layer.negated, layer.producer = negative, producer
    if problems:
        raise ValueError(
            f"convert_batchnorm cannot keep the function of {len(problems)} BatchNorm layer(s):\n  - "
            + "\n  - ".join(problems[:8]) + (f"\n  - ... and {len(problems) - 8} more" if len(problems) > 8 else "")
            + "\nThis layout makes an exact conversion impossible for these values. mode='eval' keeps the "
            "eval-mode function where only the scale is the problem; mode='fresh' draws new logits "
            "(the paper's initialisation, for training from scratch)."
        )
    for name in scales.linears:
        fold.linears[name] = (factor(("in", name)), factor(("out", name)))
    for name in scales.clamps:
        fold.clamps[name] = factor(("clamp", name))
    return fold


@torch.no_grad()
def apply_fold(model: nn.Module, originals: dict[str, nn.Module], fold: Fold) -> None:
    """Write ``fold`` into ``model`` (computed in float64, stored in each tensor's dtype)."""
    modules = dict(model.named_modules())
    flips = {plan.producer: plan.negated for plan in fold.layers.values() if plan.producer is not None}
    for name, plan in fold.layers.items():
        _write_layer(originals[name], modules[name], plan)
    for name, (k_in, k_out) in fold.linears.items():
        if k_in != 1.0 or k_out != 1.0 or name in flips:
            _write_linear(modules[name], k_in, k_out, flips.get(name))
    for name, k in fold.clamps.items():
        if k != 1.0:
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            old = getattr(owner, child)  # ReLU6 is a Hardtanh(0, 6)
            setattr(owner, child, nn.Hardtanh(old.min_val / k, old.max_val / k, inplace=old.inplace))


def _write_layer(old: nn.Module, new: nn.Module, plan: LayerFold) -> None:
    sign = 1.0 - 2.0 * plan.negated.double() if plan.negated is not None else 1.0
    new.eps = old.eps / plan.k**2
    if new.running_mean is not None:
        new.running_mean.copy_(sign * old.running_mean.double() / plan.k)
        var = old.running_var.double() / plan.k**2
        if plan.gain != 1.0:  # eval mode only: sqrt(var + eps) shrinks by the gain
            var = ((var + new.eps) / plan.gain**2 - new.eps).clamp_min(0.0)
        new.running_var.copy_(var)
    if new.affine:
        ratio = _gamma(old).abs() / (plan.c * plan.gain)
        new.weight.copy_(torch.logit(ratio.clamp_min(smallest_scale(new.weight.dtype))))
        if new.bias is not None:
            new.bias.copy_(old.bias.double() / plan.c if old.bias is not None else torch.zeros_like(ratio))


def _write_linear(m: nn.Module, k_in: float, k_out: float, negated: Tensor | None) -> None:
    weight = m.weight.double() * (k_in / k_out)
    bias = m.bias.double() / k_out if m.bias is not None else None
    if negated is not None:
        sign = 1.0 - 2.0 * negated.double()
        axis = 1 if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
        weight = weight * sign.reshape([-1 if d == axis else 1 for d in range(weight.dim())])
        bias = bias * sign if bias is not None else None
    m.weight.copy_(weight)
    if bias is not None:
        m.bias.copy_(bias)
