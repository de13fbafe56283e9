"""Per-layer-type rules of the pruning: what a layer does to channels, what it costs, how it is sliced.

One :class:`LayerHandler` per layer type, found through the class hierarchy
(:func:`handler_for`), so a subclass (timm's ``Linear``, ``Conv2dSame``, ``BatchNormAct2d``, our
bounded BatchNorms) is counted and sliced like its base. Adding a layer type is one handler and
one :func:`register` call; the graph, the FLOP count and ``apply`` ask the registry.

Roles (:meth:`LayerHandler.role`): ``"conv"`` reads all input channels (``groups=1``),
``"channelwise"`` keeps channels apart in groups of equal width in and out (depthwise and
grouped convolutions with ``in == out``; ``unit`` channels per group), ``"linear"``, ``"norm"``
(a prunable BatchNorm), or ``None`` (a layer the pruning cannot see through).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..nn import BoundedBatchNorm2d

__all__ = ["LayerCost", "LayerHandler", "handler_for", "register", "SLICED_TENSORS"]

# Tensors a handler slices, by attribute name; a module's other state is carried over as it is.
SLICED_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class LayerCost:
    """What one conv/linear layer costs: ``positions * out * (in / groups) * kernel`` MACs."""

    positions: int
    out_features: int
    in_per_group: int
    kernel: int

    @property
    def macs(self) -> int:
        """Multiply-accumulates: ``positions * out_features * in_per_group * kernel``."""
        return self.positions * self.out_features * self.in_per_group * self.kernel


class LayerHandler:
    """Base handler: a layer with no channel rules (never sliced, costs nothing)."""

    def role(self, module: nn.Module) -> str | None:
        """How the layer treats channels (see the module docstring)."""
        return None

    def unit(self, module: nn.Module) -> int:
        """Channels per group of a ``"channelwise"`` layer: removed only as whole groups of this width."""
        return 1

    def cost(self, module: nn.Module, output_shape: tuple) -> LayerCost | None:
        """The layer's cost for one call producing ``output_shape`` (``None``: not counted)."""
        return None

    def resize(self, module: nn.Module, out_index: Tensor | None, in_index: Tensor | None) -> None:
        """Set the width attributes of ``module`` after its tensors were sliced with these indices."""


class ConvHandler(LayerHandler):
    """``nn.Conv2d`` and subclasses: output channels on dim 0 of the weight, input channels on dim 1."""

    def role(self, module: nn.Module) -> str | None:
        if module.groups == 1:
            return "conv"
        if module.in_channels == module.out_channels:
            return "channelwise"  # depthwise (unit 1) or grouped with equal widths per group
        return None

    def unit(self, module: nn.Module) -> int:
        return module.out_channels // module.groups

    def cost(self, module: nn.Module, output_shape: tuple) -> LayerCost:
        positions = output_shape[0] * math.prod(output_shape[2:])
        return LayerCost(positions, module.out_channels, module.in_channels // module.groups,
                         math.prod(module.kernel_size))

    def resize(self, module: nn.Module, out_index: Tensor | None, in_index: Tensor | None) -> None:
        if module.groups > 1:  # whole groups go: the group width stays, their number shrinks
            unit = module.out_channels // module.groups
            module.out_channels = module.in_channels = len(out_index)
            module.groups = len(out_index) // unit
            return
        if out_index is not None:
            module.out_channels = len(out_index)
        if in_index is not None:
            module.in_channels = len(in_index)


class LinearHandler(LayerHandler):
    """``nn.Linear`` and subclasses."""

    def role(self, module: nn.Module) -> str:
        return "linear"

    def cost(self, module: nn.Module, output_shape: tuple) -> LayerCost:
        return LayerCost(math.prod(output_shape) // output_shape[-1], module.out_features, module.in_features, 1)

    def resize(self, module: nn.Module, out_index: Tensor | None, in_index: Tensor | None) -> None:
        if out_index is not None:
            module.out_features = len(out_index)
        if in_index is not None:
            module.in_features = len(in_index)


class NormHandler(LayerHandler):
    """``nn.BatchNorm2d``, :class:`~rnip_ext.BoundedBatchNorm2d` and their subclasses (timm's
    ``BatchNormAct2d`` and our norm-activation layers included: their activation is elementwise,
    so it keeps channels apart and travels with them)."""

    def role(self, module: nn.Module) -> str:
        return "norm"

    def resize(self, module: nn.Module, out_index: Tensor | None, in_index: Tensor | None) -> None:
        module.num_features = len(out_index)


_REGISTRY: dict[type, LayerHandler] = {}


def register(layer_type: type, handler: LayerHandler) -> None:
    """Use ``handler`` for ``layer_type`` and its subclasses (unless a subclass has its own)."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    _REGISTRY[layer_type] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the nearest registered class in ``type(module)``'s MRO, or ``None``."""
    for cls in type(module).__mro__:
        handler = _REGISTRY.get(cls)
        if handler is not None:
            return handler
    return None


register(nn.Conv2d, ConvHandler())
register(nn.Linear, LinearHandler())
register(nn.BatchNorm2d, NormHandler())
register(BoundedBatchNorm2d, NormHandler())
