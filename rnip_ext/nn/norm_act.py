"""Bounded BatchNorm fused with the activation after it: the bounded twin of timm's ``BatchNormAct2d``.

timm builds many of its networks (RegNet, EfficientNet, MobileNetV2/V3, CSPNet, DenseNet...) from
``BatchNormAct2d``, an ``nn.BatchNorm2d`` subclass with two children, ``drop`` and ``act``, whose
forward is ``act(drop(batch_norm(x)))``. Replacing such a layer by a plain bounded BatchNorm would
drop the activation; :class:`BoundedBatchNormAct2d` keeps the children and the order.

Other code recognises a norm-activation layer by that shape: a BatchNorm with ``drop`` and ``act``
children (:func:`is_norm_act`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .bounded_batchnorm import BoundedBatchNorm2d
from .sync_bounded_batchnorm import SyncBoundedBatchNorm2d

__all__ = ["BoundedBatchNormAct2d", "SyncBoundedBatchNormAct2d", "is_norm_act"]


def is_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm with ``drop`` and ``act`` children (a norm-activation layer)."""
    is_norm = isinstance(module, (BoundedBatchNorm2d, nn.modules.batchnorm._BatchNorm))
    children = module._modules if is_norm else {}
    return isinstance(children.get("drop"), nn.Module) and isinstance(children.get("act"), nn.Module)


def _child(value, name: str) -> nn.Module:
    if value is None:
        return nn.Identity()
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module or None, got {type(value).__name__}")
    return value


class _ActAfterNorm:
    """``forward = act(drop(norm(x)))`` on top of a bounded BatchNorm's forward."""

    drop: nn.Module
    act: nn.Module

    def forward(self, input: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(input)))


class BoundedBatchNormAct2d(_ActAfterNorm, BoundedBatchNorm2d):
    r""":class:`BoundedBatchNorm2d` followed by ``drop`` and then ``act``.

    .. math::

        y = \mathrm{act}\Big(\mathrm{drop}\big(\sigma(w) \, \frac{x - \mathrm{E}[x]}
            {\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta\big)\Big)

    The order and the children of timm's ``BatchNormAct2d``, so a converted layer keeps its
    activation and its state_dict keys (``weight``, [``bias``], ``running_mean``, ``running_var``,
    ``num_batches_tracked``, and those of ``act``/``drop`` if they hold any). Everything else
    (arguments, running statistics, eval mode, deepcopy, pickling, the regulariser, importance)
    is :class:`BoundedBatchNorm2d`'s.

    Args: those of :class:`BoundedBatchNorm2d`, plus keyword-only ``act`` and ``drop``: modules
    applied to the normalised output, ``nn.Identity()`` when ``None``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = False,
        backend: str | None = None,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
    ) -> None:
        act, drop = _child(act, "act"), _child(drop, "drop")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, backend=backend
        )
        self.drop = drop
        self.act = act

    @classmethod
    def _can_replace(cls, bn: nn.Module) -> bool:
        return super()._can_replace(bn) or is_norm_act(bn)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, *, bias: bool = False) -> "BoundedBatchNormAct2d":
        """:meth:`BoundedBatchNorm2d.from_batchnorm`, keeping ``bn``'s ``drop`` and ``act`` children
        (the same module objects) when it has them."""
        new = super().from_batchnorm(bn, bias=bias)
        if is_norm_act(bn):
            new.drop, new.act = bn.drop, bn.act
        return new


class SyncBoundedBatchNormAct2d(_ActAfterNorm, SyncBoundedBatchNorm2d):
    """:class:`SyncBoundedBatchNorm2d` followed by ``drop`` and then ``act``: what
    :func:`~rnip_ext.convert_sync_batchnorm` makes of a :class:`BoundedBatchNormAct2d`.

    Args: those of :class:`SyncBoundedBatchNorm2d`, plus keyword-only ``act`` and ``drop``
    (``nn.Identity()`` when ``None``).
    """

    def __init__(self, *args, act: nn.Module | None = None, drop: nn.Module | None = None, **kwargs) -> None:
        act, drop = _child(act, "act"), _child(drop, "drop")
        super().__init__(*args, **kwargs)
        self.drop = drop
        self.act = act
