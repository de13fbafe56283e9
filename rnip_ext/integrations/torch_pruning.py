"""Pruning models with :class:`~rnip_ext.BoundedBatchNorm2d` through Torch-Pruning's dependency graph.

:func:`rnip_ext.pruning.plan` removes only channels it can trace to a BatchNorm with nothing but
convolutions and linear layers downstream. For anything else (residual streams, concatenations,
attention, custom blocks) use Torch-Pruning (``pip install rnip_ext[torch-pruning]``), which
groups every coupled layer through its dependency graph::

    from rnip_ext.integrations import torch_pruning as rtp

    p = rtp.pruner(model, torch.randn(1, 3, 224, 224), pruning_ratio=0.5)
    p.step()                                    # prunes `model` in place

or with Torch-Pruning's own classes::

    tp.pruner.BasePruner(model, x, importance=rtp.BoundedScaleImportance(),
                         customized_pruners=rtp.customized_pruners(), ignored_layers=[model.fc])

Both pieces are needed. :class:`~rnip_ext.BoundedBatchNorm2d` deliberately does not derive from
``torch.nn.modules.batchnorm._BatchNorm``, so Torch-Pruning does not recognise it: it reports its
``weight`` as an "unwrapped parameter", slices that tensor alone and leaves ``num_features``, the
running statistics and ``bias`` at the old size, and the pruned network fails in its first
forward pass. :class:`BoundedBatchNormPruner` slices the layer as a whole.
:class:`BoundedScaleImportance` scores channels by ``sigmoid(weight)``; Torch-Pruning's
``BNScaleImportance`` would look only for ``_BatchNorm`` layers, find none, and prune nothing.

Unlike :func:`rnip_ext.pruning.apply`, Torch-Pruning only slices: it does not fold what a removed
channel still outputs into the next layer's bias. With the default ``bias=False`` a receded
channel outputs ~0 and nothing is lost (a channel whose logit is ``-inf`` outputs exactly 0, and
the pruned network then computes exactly what the original did); with ``bias=True`` the removed
channels' ``relu(bias)`` goes missing downstream.

Torch-Pruning 1.5.1 or later is needed: earlier releases fail in global pruning on any group an
importance cannot score (here: a group without BatchNorm, such as VGG-16's hidden linear layers).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..nn import BoundedBatchNorm2d
from ..pruning.importance import bn_scores

try:
    import torch_pruning as tp
except ImportError as err:  # an optional dependency: say how to get it
    raise ImportError(
        "rnip_ext.integrations.torch_pruning needs Torch-Pruning: install it with "
        "`pip install rnip_ext[torch-pruning]` (or `pip install torch-pruning`)"
    ) from err

# Torch-Pruning up to 1.5.1 calls it MetaPruner; 1.5.2 renamed it BasePruner, keeping the old name.
_BasePruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner

__all__ = ["BoundedBatchNormPruner", "BoundedScaleImportance", "customized_pruners", "pruner"]

REDUCTIONS = ("max", "min", "mean", "sum", "prod")
NORMALIZERS = (None, "mean", "max", "sum")


def _is_batchnorm(module) -> bool:
    return isinstance(module, (BoundedBatchNorm2d, nn.modules.batchnorm._BatchNorm))


class BoundedScaleImportance(tp.importance.Importance):
    """Channel importance of a Torch-Pruning group from its BatchNorm scales.

    Each BatchNorm in the group scores the channels it holds: ``sigmoid(weight)`` for a
    :class:`~rnip_ext.BoundedBatchNorm2d`, ``|weight|`` for a plain BatchNorm, 1 without a scale
    (the scores of :func:`rnip_ext.pruning.channel_importance`). Convolutions and linear layers
    do not score. The scores are then combined per channel of the group's root layer:

    * ``group_reduction="max"`` (default): a channel is as important as its most important
      BatchNorm. It is removable only once every BatchNorm that writes it has receded, which is
      what makes the removal harmless where several branches are summed into one channel (a
      residual stream). It is conservative for BatchNorms in series (a depthwise block), where
      one receded scale already silences the channel.
    * ``"min"``: the least important BatchNorm decides, as :func:`rnip_ext.pruning.plan` does for
      its coupled layers (which are always in series). On a residual stream this removes
      channels that other branches still use.
    * ``"mean"``, ``"sum"``, ``"prod"``: over the BatchNorms that hold the channel.

    A channel that no BatchNorm of the group holds scores 1, the score of a layer without a
    scale. ``normalizer`` then rescales the group's scores: ``None`` (default) leaves them
    as they are, so that a global ranking compares raw ``sigmoid(weight)`` across layers, the
    paper's single global threshold (bounded scales share one range, (0, 1)); ``"mean"``,
    ``"max"``, ``"sum"`` divide by that statistic of the group (``"mean"`` is what
    ``BNScaleImportance`` does by default), and a callable maps the scores itself.

    Call it as Torch-Pruning calls ``BNScaleImportance``: with a group, returning a float32 CPU
    tensor with one score per index of the group's root, or ``None`` when the group holds no
    BatchNorm (Torch-Pruning then leaves the group alone).

    Raises ``RuntimeError`` when the group's dependency graph was built without
    :func:`customized_pruners` for a model that holds ``BoundedBatchNorm2d`` layers: pruning would
    break those layers (see the module's documentation).
    """

    def __init__(self, group_reduction: str = "max", normalizer: str | Callable | None = None) -> None:
        if group_reduction not in REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {REDUCTIONS}, got {group_reduction!r}")
        if not callable(normalizer) and normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS} or a callable, got {normalizer!r}")
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        # Weak: an id could be reused by a later graph, and the graphs hold whole models.
        self._checked_graphs: weakref.WeakSet = weakref.WeakSet()

    def _check_graph(self, group) -> None:
        """Refuse a graph on which Torch-Pruning would slice bounded BatchNorms wrongly."""
        graph = getattr(group, "_DG", None)
        if graph is None or graph in self._checked_graphs:
            return
        model = getattr(graph, "model", None)
        handled = getattr(graph, "CUSTOMIZED_PRUNERS", {})
        if isinstance(model, nn.Module):
            for name, module in model.named_modules():
                if isinstance(module, BoundedBatchNorm2d) and type(module) not in handled:
                    raise RuntimeError(
                        f"the dependency graph has no pruner for BoundedBatchNorm2d layers (e.g. "
                        f"'{name}'): Torch-Pruning would slice their weight alone and break the "
                        "model. Build the pruner with customized_pruners="
                        "rnip_ext.integrations.torch_pruning.customized_pruners(model)"
                    )
        self._checked_graphs.add(graph)

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        self._check_graph(group)
        root = group[0]
        root_idxs = root.root_idxs if root.root_idxs is not None else root.idxs
        position = {int(r): k for k, r in enumerate(root_idxs)}
        rows, seen = [], set()
        for item in group:
            layer = item.dep.target.module
            # A layer reached twice (through its input and its output) counts once.
            if not _is_batchnorm(layer) or id(layer) in seen:
                continue
            seen.add(id(layer))
            roots = item.root_idxs if item.root_idxs is not None else item.idxs
            if len(roots) == 0 or any(r is None for r in roots):
                continue
            scores = bn_scores(layer)[torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)]
            row = torch.full((len(position),), math.nan)
            row[torch.as_tensor([position[int(r)] for r in roots], dtype=torch.long)] = scores
            rows.append(row)
        if not rows:
            return None
        return self._normalize(self._reduce(torch.stack(rows)))

    def _reduce(self, rows: Tensor) -> Tensor:
        """Combine the ``(layers, channels)`` scores, NaN where a layer does not hold a channel."""
        held = ~rows.isnan()
        if self.group_reduction == "max":
            out = rows.nan_to_num(-math.inf).amax(0)
        elif self.group_reduction == "min":
            out = rows.nan_to_num(math.inf).amin(0)
        elif self.group_reduction == "mean":
            out = rows.nansum(0) / held.sum(0).clamp_min(1)
        elif self.group_reduction == "sum":
            out = rows.nansum(0)
        else:
            out = rows.nan_to_num(1.0).prod(0)
        return torch.where(held.any(0), out, torch.ones_like(out))

    def _normalize(self, scores: Tensor) -> Tensor:
        if self.normalizer is None:
            return scores
        if callable(self.normalizer):
            return self.normalizer(scores)
        if self.normalizer == "mean":
            return scores / scores.mean()
        if self.normalizer == "max":
            return scores / scores.max()
        return scores / scores.sum()


def _kept_channels(layer: BoundedBatchNorm2d, idxs: Sequence[int]) -> Tensor:
    removed = torch.as_tensor([int(i) for i in idxs], dtype=torch.long)
    channels = layer.num_features
    bad = removed[(removed < 0) | (removed >= channels)]
    if len(bad):
        raise IndexError(
            f"channel indices {bad.tolist()[:5]} are out of range for a BoundedBatchNorm2d with "
            f"{channels} channels"
        )
    keep = torch.ones(channels, dtype=torch.bool)
    keep[removed] = False
    if not keep.any():
        raise ValueError(f"cannot remove all {channels} channels of a BoundedBatchNorm2d")
    return keep.nonzero().flatten()


def _sliced_parameter(param: nn.Parameter, keep: Tensor) -> nn.Parameter:
    keep = keep.to(param.device)
    new = nn.Parameter(param.detach().index_select(0, keep), requires_grad=param.requires_grad)
    if param.grad is not None:  # an accumulated gradient stays usable for the next step
        new.grad = param.grad.index_select(0, keep)
    return new


class BoundedBatchNormPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning's pruning function for :class:`~rnip_ext.BoundedBatchNorm2d` (and subclasses).

    Removing channels ``idxs`` keeps the others in order in ``weight``, ``bias`` (when the layer
    has one; ``None`` by default), ``running_mean`` and ``running_var`` (when tracked), and sets
    ``num_features``; ``num_batches_tracked``, ``requires_grad`` and accumulated gradients are
    kept. A BatchNorm's input and output channels are the same channels, so pruning either
    prunes both (``prune_in_channels is prune_out_channels``, which is how Torch-Pruning learns
    that the layer passes a pruning on).

    Register it through :func:`customized_pruners`: Torch-Pruning looks pruners up by the exact
    class of a layer.
    """

    TARGET_MODULES = BoundedBatchNorm2d

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove channels ``idxs`` of ``layer`` in place and return it."""
        if not isinstance(layer, BoundedBatchNorm2d):
            raise TypeError(f"BoundedBatchNormPruner prunes BoundedBatchNorm2d layers, got {type(layer).__name__}")
        keep = _kept_channels(layer, idxs)
        for name in ("weight", "bias"):
            param = getattr(layer, name)
            if param is not None:
                setattr(layer, name, _sliced_parameter(param, keep))
        for name in ("running_mean", "running_var"):
            buffer = getattr(layer, name)
            if buffer is not None:
                setattr(layer, name, buffer.index_select(0, keep.to(buffer.device)))
        layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        """The layer's channel count, ``num_features``."""
        return layer.num_features

    get_in_channels = get_out_channels


def customized_pruners(model: nn.Module | None = None) -> dict[type, BoundedBatchNormPruner]:
    """``{BoundedBatchNorm2d: BoundedBatchNormPruner()}`` for Torch-Pruning's ``customized_pruners``.

    Torch-Pruning matches a layer's exact class, so with ``model`` every subclass of
    ``BoundedBatchNorm2d`` found in it is mapped to the same pruner too.
    """
    layer_pruner = BoundedBatchNormPruner()
    pruners = {BoundedBatchNorm2d: layer_pruner}
    if model is not None:
        for module in model.modules():
            if isinstance(module, BoundedBatchNorm2d):
                pruners[type(module)] = layer_pruner
    return pruners


def _run(model: nn.Module, example_inputs):
    # The calling conventions of Torch-Pruning's tracer: a dict of keyword arguments, a sequence
    # of positional ones, or one tensor.
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


@torch.no_grad()
def _last_layer(model: nn.Module, example_inputs) -> nn.Module | None:
    """The conv or linear layer that runs last on ``example_inputs``: the classifier."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda module, args, output: order.append(module))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    training = model.training
    try:
        model.eval()
        _run(model, example_inputs)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return order[-1] if order else None


def pruner(model: nn.Module, example_inputs, pruning_ratio: float, global_pruning: bool = True, **kwargs):
    """A Torch-Pruning ``BasePruner`` (``MetaPruner``) for a model with bounded BatchNorms.

    It ranks channels with :class:`BoundedScaleImportance` (one global ranking over all groups
    by default, the paper's global threshold) and slices ``BoundedBatchNorm2d`` layers with
    :func:`customized_pruners`. ``pruning_ratio`` is the fraction of the groups' channels to
    remove; call ``.step()`` on the result to prune ``model`` in place.

    ``kwargs`` go to ``torch_pruning.pruner.BasePruner`` and may replace the defaults:
    ``importance``, ``customized_pruners`` (merged over ours), ``ignored_layers`` (default: the
    last conv/linear layer to run on ``example_inputs``, found with one extra forward pass, so
    that the class count stays), ``round_to``, ``iterative_steps``, ``max_pruning_ratio``, ...
    The model's training mode is restored after Torch-Pruning's tracing (which leaves it in
    eval mode).
    """
    kwargs.setdefault("importance", BoundedScaleImportance())
    pruners = customized_pruners(model)
    pruners.update(kwargs.pop("customized_pruners", None) or {})
    if "ignored_layers" not in kwargs:
        last = _last_layer(model, example_inputs)
        kwargs["ignored_layers"] = [] if last is None else [last]
    # Torch-Pruning's BasePruner mutates these dict arguments, and their defaults are shared by
    # every pruner it builds: fresh ones keep layers of one model out of the next.
    for name in ("in_channel_groups", "out_channel_groups", "num_heads"):
        kwargs.setdefault(name, {})
    training = model.training
    try:
        return _BasePruner(
            model,
            example_inputs,
            pruning_ratio=pruning_ratio,
            global_pruning=global_pruning,
            customized_pruners=pruners,
            **kwargs,
        )
    finally:
        model.train(training)
