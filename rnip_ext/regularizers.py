"""Sparsity regularisers on BatchNorm scales and the paper's optimiser parameter groups.

Each regulariser binds the layers present in the model when it is built and, when called,
returns a differentiable scalar to add to the loss::

    loss = criterion(model(x), y) + reg()

A model pruned or converted afterwards needs a new regulariser (and a new optimiser).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as RF
from .nn import BoundedBatchNorm2d

__all__ = ["RecedingRegularizer", "L1Regularizer", "PolarizationRegularizer", "param_groups"]


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"strength must be a number, got {type(strength).__name__}")
    if not (strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"strength must be finite and >= 0, got {strength}")
    return float(strength)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")


def _bounded_layers(model: nn.Module) -> list[BoundedBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, BoundedBatchNorm2d) and m.weight is not None]


def _plain_bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


class RecedingRegularizer:
    r"""The receding regulariser over every affine ``BoundedBatchNorm2d`` of a model.

    .. math::

        \mathrm{reg}() = \lambda \sum_{\text{layers}} \sum_c s_c (1 - \ln s_c),
        \qquad s_c = \sigma(w_c + b)

    with ``strength`` :math:`\lambda` and ``shift`` :math:`b`. The paper's values: ``1e-3`` and
    ``3`` for VGG-16 (the defaults), ``1e-4`` and ``0`` for ResNet-56. Its gradient
    :math:`-\lambda \ln(s) s (1 - s) \ge 0` pushes only low-importance channels down, which makes
    the importances bimodal.

    Fusion: the regulariser attaches itself to its layers. On the Triton path each layer's
    forward then also returns its per-channel penalty (cheap) as an output of the fused op, and
    :meth:`penalty` sums those recorded values; their gradient, scaled by whatever the loss
    applies (loss weights, accumulation, ``GradScaler``), enters the same backward kernel that
    computes ``d(weight)``. Layers that did not record a value since the last call (eager path,
    eval mode, no forward yet) contribute ``receding_penalty(weight, shift)`` through autograd.
    Both give the same value and gradient. A recorded value is used once, only by a call after
    the forward that made it and before the weights change (otherwise the penalty is recomputed).
    Its gradient flows through that forward's graph, so backpropagate it with the loss
    (``(criterion + reg()).backward()``); to backpropagate the penalty on its own after the
    loss's backward, build the regulariser with ``fused=False``.
    """

    def __init__(self, model: nn.Module, strength: float = 1e-3, shift: float = 3.0, *, fused: bool = True) -> None:
        _check_model(model)
        self.strength = _check_strength(strength)
        self.shift = RF._check_shift(shift)
        self.layers = _bounded_layers(model)
        if not self.layers:
            raise ValueError(
                "RecedingRegularizer found no BoundedBatchNorm2d with affine=True in the model; "
                "convert it first with rnip_ext.convert_batchnorm(model)"
            )
        self.fused = bool(fused)
        for m in self.layers:
            m._receding_shift = self.shift if self.fused else None
            m._recorded_penalty = None

    def penalty(self) -> Tensor:
        """The unscaled sum over layers of ``receding_penalty(layer.weight, shift)``."""
        terms = []
        for m in self.layers:
            recorded = m.take_recorded_penalty(self.shift) if self.fused else None
            terms.append(recorded.sum() if recorded is not None else RF.receding_penalty(m.weight, self.shift))
        return torch.stack(terms).sum()

    def __call__(self) -> Tensor:
        """``strength * penalty()``: the term to add to the loss."""
        return self.strength * self.penalty()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(strength={self.strength}, shift={self.shift}, "
            f"layers={len(self.layers)})"
        )


class L1Regularizer:
    r"""Network slimming (Liu et al. 2017) on plain BatchNorm scales: ``strength * sum |gamma|``.

    Binds every affine ``torch.nn`` BatchNorm (``_BatchNorm`` subclasses; bounded layers are not
    among them). The paper's baseline values: ``1e-4`` for VGG, ``1e-5`` for ResNet.
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4) -> None:
        _check_model(model)
        self.strength = _check_strength(strength)
        self.layers = _plain_bn_layers(model)
        if not self.layers:
            raise ValueError(
                "L1Regularizer found no affine nn.BatchNorm layer in the model (it regularises "
                "plain BatchNorm scales; bounded layers use RecedingRegularizer)"
            )

    def __call__(self) -> Tensor:
        """``strength * sum over layers and channels of |gamma|``."""
        return self.strength * torch.stack([m.weight.abs().sum() for m in self.layers]).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, layers={len(self.layers)})"


class PolarizationRegularizer:
    r"""Polarization regulariser (Zhuang et al., NeurIPS 2020) on plain BatchNorm scales.

    .. math::

        \mathrm{reg}() = \lambda \sum_i \left( t |\gamma_i| - |\gamma_i - \bar\gamma| \right)

    over every scaling factor :math:`\gamma_i` of every affine BatchNorm in the model, with
    :math:`\bar\gamma` the mean over all of them. As in the authors' code, :math:`\bar\gamma` is
    treated as a constant in the gradient (``detach``), and they clamp the scales to [0, 1] after
    each optimiser step: call :meth:`clamp_` for that.
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4, t: float = 1.0) -> None:
        _check_model(model)
        self.strength = _check_strength(strength)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"t must be a finite number, got {t!r}")
        self.t = float(t)
        self.layers = _plain_bn_layers(model)
        if not self.layers:
            raise ValueError("PolarizationRegularizer found no affine nn.BatchNorm layer in the model")

    def __call__(self) -> Tensor:
        """``strength * sum(t * |gamma| - |gamma - mean(gamma).detach()|)``."""
        gammas = torch.cat([m.weight.reshape(-1) for m in self.layers])
        mean = gammas.detach().mean()
        return self.strength * (self.t * gammas.abs() - (gammas - mean).abs()).sum()

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        """Clamp every bound scale to ``[low, high]`` in place (the authors do so after each step)."""
        for m in self.layers:
            m.weight.clamp_(low, high)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, t={self.t}, layers={len(self.layers)})"


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 1e-4,
    bn_lr_scale: float = 10.0,
    *,
    bn_types: Iterable[type] = (BoundedBatchNorm2d,),
) -> list[dict]:
    """The paper's optimiser groups, ready for ``torch.optim.SGD(param_groups(...), momentum=0.9, nesterov=True)``.

    Parameters of layers of ``bn_types`` (by default the bounded BatchNorms) get
    ``lr = bn_lr_scale * lr`` and no weight decay; every other trainable parameter gets ``lr`` and
    ``weight_decay``. Shared parameters appear once; frozen ones (``requires_grad=False``) are
    left out; empty groups are dropped.
    """
    _check_model(model)
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("bn_lr_scale", bn_lr_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 and math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    bn_types = tuple(bn_types)
    seen: set[int] = set()
    bn_params, other_params = [], []
    for module in model.modules():
        target = bn_params if isinstance(module, bn_types) else other_params
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                target.append(p)
    groups = []
    if bn_params:
        groups.append({"params": bn_params, "lr": bn_lr_scale * lr, "weight_decay": 0.0})
    if other_params:
        groups.append({"params": other_params, "lr": lr, "weight_decay": weight_decay})
    return groups
