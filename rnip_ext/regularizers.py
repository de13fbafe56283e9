"""Sparsity regularisers on BatchNorm scales and the paper's optimiser parameter groups.

Each regulariser binds the layers present in the model when it is built and, when called,
returns a differentiable scalar to add to the loss::

    loss = criterion(model(x), y) + reg()
    loss.backward(); optimizer.step(); reg.after_step()

The protocol a training loop relies on (:class:`Regularizer`): ``reg()`` (the term to add,
``strength * penalty()``), ``after_step()`` (after each optimiser step: e.g. the polarisation
clamp), ``rebind(model)`` (after the model was narrowed or rebuilt), ``state_dict()`` /
``load_state_dict()`` (plain values for checkpoints). :class:`rnip_ext.BudgetPruner` follows it
too. A model converted afterwards needs a new regulariser.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import functional as RF
from ._validation import check_number, is_number
from .nn import BoundedBatchNorm2d

__all__ = ["BaseRegularizer", "L1Regularizer", "PolarizationRegularizer", "RecedingRegularizer", "Regularizer",
           "param_groups"]


def _check_strength(strength: float) -> float:
    if not is_number(strength, finite=False):
        raise TypeError(f"strength must be a number, got {type(strength).__name__}")
    if not (strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"strength must be finite and >= 0, got {strength}")
    return float(strength)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")


def _plain_bn_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]


def _logit(m: BoundedBatchNorm2d) -> Tensor:
    # A dict read (nn.Module.__getattr__ costs ~1 us); a parametrised weight is not in it.
    w = m._parameters.get("weight")
    return m.weight if w is None else w


def _flat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@runtime_checkable
class Regularizer(Protocol):
    """What :func:`rnip_ext.training.fit` asks of a regulariser (see the module docstring)."""

    def __call__(self) -> Tensor: ...

    def after_step(self) -> None: ...

    def rebind(self, model: nn.Module): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class BaseRegularizer(abc.ABC):
    """Defaults of the :class:`Regularizer` protocol for a regulariser with a ``strength``:
    ``reg() = strength * penalty()``, nothing after a step, the strength as its state."""

    strength: float

    @abc.abstractmethod
    def penalty(self) -> Tensor:
        """The unscaled penalty."""

    def __call__(self) -> Tensor:
        """``strength * penalty()``: the term to add to the loss."""
        return self.strength * self.penalty()

    def after_step(self) -> None:
        """Called after each optimiser step; nothing by default."""

    def state_dict(self) -> dict:
        """Plain values for a checkpoint (``weights_only=True``): the strength."""
        return {"strength": self.strength}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.strength = _check_strength(state["strength"])


NORMALIZE = ("layer", None)
COSTS = ("channels", "flops", "params")


class RecedingRegularizer(BaseRegularizer):
    r"""The receding regulariser over every affine ``BoundedBatchNorm2d`` of a model.

    ``normalize="layer"`` (default), on layer-relative importances:

    .. math::

        \mathrm{reg}() = \lambda \sum_{\text{layers } l} k_l \sum_c t_c (1 - \ln t_c),
        \qquad t_c = \sigma(\operatorname{logit}(u_c) + b),
        \qquad u_c = \sigma(w_c) / \max_{j \in l} \sigma(w_j)

    ``normalize=None``, the paper's formulation:

    .. math::

        \mathrm{reg}() = \lambda \sum_{\text{layers } l} k_l \sum_c s_c (1 - \ln s_c),
        \qquad s_c = \sigma(w_c + b)

    with ``strength`` :math:`\lambda`, ``shift`` :math:`b` and cost weights :math:`k_l` (1 with
    ``cost="channels"``). The paper's values: ``1e-3`` and ``3`` for VGG-16 (the defaults),
    ``1e-4`` and ``0`` for ResNet-56. Both gradients are never negative on a receded channel,
    which makes the importances bimodal.

    Why ``"layer"`` is the default: when the layer's channels feed a convolution followed by a
    BatchNorm, that BatchNorm renormalises, so the paper's penalty can fall by shrinking every
    scale of a layer together at no cost to the loss -- whole layers recede (docs/method.md has
    the measurement), and ``sigmoid(w)`` stops meaning "removable". The normalised penalty depends only on the ratios
    ``u_c``, the importance :func:`rnip_ext.pruning.channel_importance` ranks by: its gradient
    along the common-scale direction is exactly zero, the layer's strongest channel has zero
    penalty gradient of its own (it is pulled up by what pushes the others down), and channels
    recede relative to their layer. For receded channels ``t ~ u e^b``, as the paper's
    ``s ~ sigmoid(w) e^b``, so ``shift`` keeps its meaning. See
    :func:`rnip_ext.functional.relative_receding_penalty_per_channel`.

    Cost weights (``cost=``): ``"channels"`` counts every channel once (the paper);
    ``"flops"`` / ``"params"`` weight a channel's term by the multiply-accumulates (for
    ``example_inputs``, required then) / parameters it carries in the current network -- its
    producer's filter, a depthwise filter on the way, its consumers' input slices (see
    :func:`rnip_ext.pruning.flops.channel_costs`) -- so the penalty becomes a smooth count of
    active FLOPs (MorphNet's idea on the bounded scale). Normalisation: the weights have mean 1
    over all regularised channels, ``k_l = cost_l * N / sum_l' n_l' cost_l'``, so that a
    network whose channels all cost the same gets exactly the ``"channels"`` penalty and
    ``strength`` keeps its meaning. Channels outside any prunable group (e.g. a residual
    stream) cannot be removed, so they get weight 0 under ``"flops"``/``"params"``; with
    ``residual_streams=True`` the costs are read from the groups that couple each residual
    stream (as ``plan(..., residual_streams=True)`` prunes), so a stream's BatchNorms share what
    its channels save when they go from the whole stream. Every channel
    of a layer carries the same cost, so the weights are one number per layer. After pruning,
    :meth:`rebind` binds the pruned model's layers and recomputes the costs.

    Fusion: the regulariser attaches itself to its layers. With ``normalize=None`` on the
    Triton path each layer's forward then also returns its per-channel penalty (cheap) as an
    output of the fused op, and :meth:`penalty` sums those recorded values times ``k_l``; their
    gradient (``k_l`` times whatever the loss applies: loss weights, accumulation,
    ``GradScaler``) enters the same backward kernel that computes ``d(weight)``. Layers that did
    not record a value since the last call (eager path, eval mode, no forward yet) contribute
    ``receding_penalty(weight, shift)`` through autograd. Both give the same value and gradient.
    A recorded value is used once, only by a call after the forward that made it and before the
    weights change (otherwise the penalty is recomputed). Its gradient flows through that
    forward's graph, so backpropagate it with the loss (``(criterion + reg()).backward()``); to
    backpropagate the penalty on its own after the loss's backward, build the regulariser with
    ``fused=False``. The fused record computes the paper's per-channel term only: with
    ``normalize="layer"`` layers record nothing and the penalty goes through one autograd node
    over all layers' logits concatenated (a segment maximum per layer; about 40 ATen ops
    forward and backward together, whatever the number of layers).

    Focus (:meth:`focus`): ``reg.focus({name: mask})`` restricts the penalty to the channels a
    boolean mask per layer selects (``k_c`` times 0 or 1; a layer not named gets no penalty),
    ``reg.focus(None)`` penalises every channel again (the default). Budget-aware training
    (:class:`rnip_ext.BudgetPruner`) uses it to make only the channels the budget
    planner would remove next recede, so the channels that stay are not shrunk with them.
    """

    _layout_cache = None  # (key, channel -> layer index, per-channel k_l); see _layout

    def __init__(self, model: nn.Module, strength: float = 1e-3, shift: float = 3.0, *, fused: bool = True,
                 normalize: str | None = "layer", cost: str = "channels", example_inputs=None,
                 residual_streams: bool = False) -> None:
        _check_model(model)
        self.strength = _check_strength(strength)
        self.shift = RF._check_shift(shift)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be 'layer' or None, got {normalize!r}")
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if cost != "channels" and example_inputs is None:
            raise ValueError(f"cost={cost!r} needs example_inputs (the input size FLOPs are counted for)")
        self.normalize = normalize
        self.cost = cost
        self.example_inputs = example_inputs
        from .pruning.graph import check_residual_streams  # late: rnip_ext.pruning imports the package

        self.residual_streams = check_residual_streams(residual_streams)
        self.fused = bool(fused)
        self.layers: list[BoundedBatchNorm2d] = []
        self.names: list[str] = []
        self.weights: list[float] = []
        self._focus: dict[str, Tensor] | None = None
        self.rebind(model)

    @property
    def uses_fused_record(self) -> bool:
        """Whether layers record their penalty in the fused forward (``fused`` and ``normalize=None``)."""
        return self.fused and self.normalize is None

    def rebind(self, model: nn.Module) -> "RecedingRegularizer":
        """Bind the bounded layers of ``model`` (e.g. after pruning) and recompute the cost weights.

        The previously bound layers are detached (they record nothing any more). A :meth:`focus`
        stays only if every layer it names exists in ``model`` with the same number of channels
        (so a focus chosen on the pruned model survives binding it); otherwise it is cleared
        and every channel is penalised again. Returns ``self``.
        """
        _check_model(model)
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d) and m.weight is not None]
        if not named:
            raise ValueError(
                "RecedingRegularizer found no BoundedBatchNorm2d with affine=True in the model; "
                "convert it first with rnip_ext.convert_batchnorm(model)"
            )
        weights = self._cost_weights(model, named)  # may raise: nothing changed yet
        for m in self.layers:
            m.attach_penalty(None)
        self.layers = [m for _, m in named]
        self.names = [n for n, _ in named]
        self.weights = weights
        if self._focus is not None:
            widths = self._widths()
            if any(widths.get(n) != len(mask) for n, mask in self._focus.items()):
                self._focus = None
        self._layout_cache = None
        for m in self.layers:
            m.attach_penalty(self.shift if self.uses_fused_record else None)
        return self

    def _widths(self) -> dict[str, int]:
        """Channels of each bound layer, by name."""
        return {n: m.num_features for n, m in zip(self.names, self.layers)}

    def focus(self, masks: dict[str, Tensor] | None) -> "RecedingRegularizer":
        """Penalise only the channels ``masks`` selects: ``{layer name: bool mask}`` (names as in
        :attr:`names`, i.e. ``model.named_modules()``; one entry per channel). Channel ``c``'s
        term is weighted by ``k_c * mask_c``; layers not named get no penalty. ``None`` clears
        the focus (every channel penalised). ``ValueError`` for an unknown layer or a mask of the
        wrong length or kind, before anything changes. Returns ``self``."""
        if masks is None:
            self._focus = None
            self._layout_cache = None  # the layout holds the focus mask
            return self
        if not isinstance(masks, dict):
            raise TypeError(f"focus takes a dict {{layer name: bool mask}} or None, got {type(masks).__name__}")
        widths = self._widths()
        checked = {}
        for name, mask in masks.items():
            if name not in widths:
                raise ValueError(f"focus: {name!r} is not a regularised layer (known: {', '.join(self.names)})")
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or mask.dim() != 1 or mask.numel() != widths[name]:
                raise ValueError(f"focus: the mask of {name!r} must be a 1-D bool tensor of {widths[name]} "
                                 f"entries, got {mask.dtype} of shape {tuple(mask.shape)}")
            checked[name] = mask.detach().cpu().clone()
        self._focus = checked
        self._layout_cache = None
        return self

    @property
    def focused(self) -> dict[str, Tensor] | None:
        """The current focus (``{layer name: bool mask}``, copies) or ``None`` (every channel)."""
        return None if self._focus is None else {n: m.clone() for n, m in self._focus.items()}

    def state_dict(self) -> dict:
        """Plain values for a checkpoint (``weights_only=True``): strength and focus."""
        focus = None if self._focus is None else {n: m.tolist() for n, m in self._focus.items()}
        return {"strength": self.strength, "focus": focus}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (bind the model, e.g. the narrowed one on resume, first)."""
        self.strength = _check_strength(state["strength"])
        focus = state.get("focus")
        self.focus(None if focus is None else {n: torch.tensor(m, dtype=torch.bool) for n, m in focus.items()})

    def _cost_weights(self, model: nn.Module, named) -> list[float]:
        if self.cost == "channels":
            return [1.0] * len(named)
        from .pruning.flops import channel_costs

        costs = channel_costs(model, self.example_inputs, "flops" if self.cost == "flops" else "params",
                              residual_streams=self.residual_streams)
        per_layer = [float(costs.get(n, 0.0)) for n, _ in named]
        channels = [m.num_features for _, m in named]
        total = sum(c * n for c, n in zip(per_layer, channels))
        if total <= 0:
            raise ValueError(f"cost={self.cost!r}: no regularised channel can be removed (no prunable channel group)")
        return [c * sum(channels) / total for c in per_layer]

    def per_channel(self, m: BoundedBatchNorm2d) -> Tensor:
        """Layer ``m``'s per-channel terms (unweighted), through the fused record when there is one."""
        if self.uses_fused_record:
            recorded = m.take_recorded_penalty(self.shift)
            if recorded is not None:
                return recorded
        if self.normalize == "layer":
            return RF.relative_receding_penalty_per_channel(m.weight, self.shift)
        return RF.receding_penalty_per_channel(m.weight, self.shift)

    def penalty(self) -> Tensor:
        """The unscaled penalty: ``sum_l k_l * sum_c term_c`` (see the class docstring).

        Computed for all layers at once, on their logits (or recorded terms) concatenated into
        one vector: a fixed number of ATen operations (kernel launches on a GPU) whatever the
        number of layers, instead of a few dozen per layer.
        """
        layers = self.layers
        logits = [_logit(m) for m in layers]
        if self.uses_fused_record:
            terms = [m.take_recorded_penalty(self.shift) for m in layers]
            if any(t is not None for t in terms):
                # Layers without a record (rare: e.g. the first step after eval) go eagerly.
                terms = [RF.receding_penalty_per_channel(w, self.shift) if t is None else t for t, w in zip(terms, logits)]
                return self._weighted_sum(_flat(terms), logits)
        flat = _flat(logits)
        if self.normalize == "layer":
            layer, cost = self._layout(flat, logits)
            return RF._segmented_relative_receding_penalty(flat, layer, len(logits), self.shift, cost)
        return self._weighted_sum(RF.receding_penalty_per_channel(flat, self.shift), logits)

    def _weighted_sum(self, per_channel: Tensor, logits: list[Tensor]) -> Tensor:
        """``sum_c k_c term_c`` for the layers' terms stored end to end in ``per_channel``."""
        _, cost = self._layout(per_channel, logits)
        return per_channel.sum() if cost is None else torch.dot(per_channel, cost)

    def _layout(self, flat: Tensor, logits: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """Each channel's layer index and cost weight ``k_l`` (None when all are 1), built once
        per device, dtype, layer sizes and ``weights`` (all re-read each call: cheap, and a layer
        may be resized or ``weights`` edited in place)."""
        key = (flat.device, flat.dtype, tuple(w.shape[0] for w in logits), tuple(self.weights))
        if self._layout_cache is None or self._layout_cache[0] != key:
            costs = None if all(k == 1.0 for k in self.weights) else self.weights
            layer, cost = RF._segment_layout(key[2], flat.device, flat.dtype, costs)
            if self._focus is not None:
                mask = torch.cat([self._focus[n] if n in self._focus else torch.zeros(len(w), dtype=torch.bool)
                                  for n, w in zip(self.names, logits)]).to(flat.device, flat.dtype)
                cost = mask if cost is None else cost * mask
            self._layout_cache = (key, layer, cost)
        return self._layout_cache[1], self._layout_cache[2]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(strength={self.strength}, shift={self.shift}, "
            f"normalize={self.normalize!r}, cost={self.cost!r}, layers={len(self.layers)})"
        )


class _PlainBatchNormRegularizer(BaseRegularizer):
    """A regulariser of every affine ``torch.nn`` BatchNorm's scale ``gamma``."""

    layers: list[_BatchNorm]

    def rebind(self, model: nn.Module) -> "_PlainBatchNormRegularizer":
        """Bind the affine plain BatchNorms of ``model``; returns ``self``."""
        _check_model(model)
        layers = _plain_bn_layers(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__} found no affine nn.BatchNorm layer in the model (it regularises "
                "plain BatchNorm scales; bounded layers use RecedingRegularizer)"
            )
        self.layers = layers
        return self


class L1Regularizer(_PlainBatchNormRegularizer):
    r"""Network slimming (Liu et al. 2017) on plain BatchNorm scales: ``strength * sum |gamma|``.

    Binds every affine ``torch.nn`` BatchNorm (``_BatchNorm`` subclasses; bounded layers are not
    among them). The paper's baseline values: ``1e-4`` for VGG, ``1e-5`` for ResNet.
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4) -> None:
        self.strength = _check_strength(strength)
        self.rebind(model)

    def penalty(self) -> Tensor:
        """``sum over layers and channels of |gamma|``."""
        return torch.stack([m.weight.abs().sum() for m in self.layers]).sum()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength}, layers={len(self.layers)})"


class PolarizationRegularizer(_PlainBatchNormRegularizer):
    r"""Polarization regulariser (Zhuang et al., NeurIPS 2020) on plain BatchNorm scales.

    .. math::

        \mathrm{reg}() = \lambda \sum_i \left( t |\gamma_i| - |\gamma_i - \bar\gamma| \right)

    over every scaling factor :math:`\gamma_i` of every affine BatchNorm in the model, with
    :math:`\bar\gamma` the mean over all of them. As in the authors' code, :math:`\bar\gamma` is
    treated as a constant in the gradient (``detach``), and they clamp the scales to [0, 1] after
    each optimiser step: :meth:`after_step` does (it is :meth:`clamp_`).
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4, t: float = 1.0) -> None:
        self.t = check_number("t", t)
        self.strength = _check_strength(strength)
        self.rebind(model)

    def penalty(self) -> Tensor:
        """``sum(t * |gamma| - |gamma - mean(gamma).detach()|)``."""
        gammas = torch.cat([m.weight.reshape(-1) for m in self.layers])
        mean = gammas.detach().mean()
        return (self.t * gammas.abs() - (gammas - mean).abs()).sum()

    def after_step(self) -> None:
        """The authors' clamp of the scales to [0, 1] after each optimiser step."""
        self.clamp_()

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
        check_number(name, value, 0)
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
