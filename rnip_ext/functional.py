"""Pure functions: the eager (PyTorch-only) reference of everything rnip_ext computes.

This module is the one place the maths lives. The CPU path of :class:`~rnip_ext.BoundedBatchNorm2d`
runs it, the tests compare the Triton kernels against it (in float64) and the benchmarks time it
as "the paper's eager formulation".

Bounded batch normalisation (per channel ``c``, over the ``N*H*W`` positions)::

    y = sigmoid(w_c) * (x - mean_c) / sqrt(var_c + eps) + b_c

Receding penalty (Suteu & Guo, arXiv 2204.06404), with ``s_c = sigmoid(w_c + shift)``::

    R(w) = sum_c s_c * (1 - log s_c)          dR/dw_c = -log(s_c) * s_c * (1 - s_c)  >= 0

Layer-normalised receding penalty (rnip_ext's default), on the layer-relative importances
``u_c = sigmoid(w_c) / max_j sigmoid(w_j)`` with the shift applied to their logits::

    R_rel(w) = sum_c t_c * (1 - log t_c),     t_c = sigmoid(logit(u_c) + shift)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "bounded_batch_norm",
    "bounded_scale",
    "receding_penalty",
    "receding_penalty_per_channel",
    "receding_penalty_grad",
    "relative_receding_penalty",
    "relative_receding_penalty_per_channel",
]


def bounded_scale(weight: Tensor | None) -> Tensor | None:
    """The effective per-channel scale ``sigmoid(weight)`` (``None`` stays ``None``: scale 1)."""
    return None if weight is None else torch.sigmoid(weight)


def bounded_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation with the bounded scale ``sigmoid(weight)``.

    ``y = sigmoid(weight) * (x - mean) / sqrt(var + eps) + bias``, where ``mean``/``var`` are the
    batch statistics when ``training`` (the running buffers are then updated in place with
    ``running = (1 - momentum) * running + momentum * batch``, the variance unbiased) and the
    running buffers otherwise. Arguments are those of :func:`torch.nn.functional.batch_norm`,
    except that ``weight`` is the unbounded logit; ``weight=None`` means scale 1, ``bias=None``
    no shift.
    """
    return F.batch_norm(
        input, running_mean, running_var, bounded_scale(weight), bias, training, momentum, eps
    )


def _sigmoid_pair(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``s = sigmoid(z)``, ``1 - s = sigmoid(-z)`` and ``log s = logsigmoid(z)``.

    ``1 - s`` is computed as ``sigmoid(-z)`` rather than by subtraction so that it keeps its
    relative precision for large ``z`` (where ``s`` rounds to 1).
    """
    return torch.sigmoid(z), torch.sigmoid(-z), F.logsigmoid(z)


def receding_penalty_grad(weight: Tensor, shift: float = 0.0) -> Tensor:
    """Per-channel gradient of the receding penalty: ``-log(s) * s * (1 - s)``, ``s = sigmoid(w + shift)``.

    Finite for every finite ``weight`` (``|weight|`` up to 1e4 and beyond): each factor is
    computed from its own stable expression, and the product underflows to 0 at both ends.
    """
    s, one_minus_s, log_s = _sigmoid_pair(weight + shift)
    return -log_s * s * one_minus_s


class _RecedingPenalty(torch.autograd.Function):
    """Per-channel ``s * (1 - log s)`` with the analytic backward ``grad * dR/dw``.

    A hand-written backward because autograd's chain rule through ``s - s * logsigmoid(z)``
    subtracts two nearly equal terms and loses all relative precision for large ``z``.
    """

    @staticmethod
    def forward(weight: Tensor, shift: float) -> Tensor:
        z = weight + shift
        return torch.sigmoid(z) * (1.0 - F.logsigmoid(z))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, shift = inputs
        ctx.save_for_backward(weight)
        ctx.shift = shift

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        return grad * receding_penalty_grad(weight, ctx.shift), None


def _check_shift(shift: float) -> float:
    if isinstance(shift, Tensor) or not isinstance(shift, (int, float)):
        raise TypeError(f"shift must be a Python number, got {type(shift).__name__}")
    shift = float(shift)
    if shift != shift or shift in (float("inf"), float("-inf")):
        raise ValueError(f"shift must be finite, got {shift}")
    return shift


def receding_penalty_per_channel(weight: Tensor, shift: float = 0.0) -> Tensor:
    """``s * (1 - log s)`` for each channel, ``s = sigmoid(weight + shift)``; values in (0, 1].

    Differentiable, with gradient ``-log(s) * s * (1 - s)`` (see :func:`receding_penalty_grad`).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    return _RecedingPenalty.apply(weight, _check_shift(shift))


def receding_penalty(weight: Tensor, shift: float = 0.0) -> Tensor:
    """The receding regulariser of one layer: ``R = sum_c s_c * (1 - log s_c)``, ``s = sigmoid(w + shift)``.

    A smooth count of active channels: each term runs from 0 (``s -> 0``) to 1 (``s -> 1``). Its
    gradient ``-log(s) * s * (1 - s)`` is never negative, so descent always pushes ``w`` down,
    hardest near ``w + shift = -1.18`` and hardly at all for channels well above ``-shift``.
    Computed stably: no NaN or inf for any finite ``weight``.
    """
    return receding_penalty_per_channel(weight, shift).sum()


class _RelativePenalty(torch.autograd.Function):
    """``h(r) = t (1 - log t)``, ``t = sigmoid(z)``, ``z = r - log(1 - e^r) + shift``, for ``r = log u <= 0``.

    ``z = logit(u) + shift``. Backward, written so that nothing is 0/0 or inf at ``u = 1``
    (``r = 0``, ``z = +inf``): with ``dz/dr = 1 / (1 - u)`` and ``sigmoid(-z) / (1 - u) =
    1 / (1 - u + u e^shift)``,

        dh/dr = -log(t) * t / ((1 - u) + e^(r + shift))     (0 at r = 0)
    """

    @staticmethod
    def forward(r: Tensor, shift: float) -> Tensor:
        z = r - torch.log(-torch.expm1(r)) + shift  # +inf at r = 0: t = 1, h = 1
        return torch.sigmoid(z) * (1.0 - F.logsigmoid(z))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        r, shift = inputs
        ctx.save_for_backward(r)
        ctx.shift = shift

    @staticmethod
    def backward(ctx, grad: Tensor):
        (r,) = ctx.saved_tensors
        z = r - torch.log(-torch.expm1(r)) + ctx.shift
        dh = -F.logsigmoid(z) * torch.sigmoid(z) / (-torch.expm1(r) + torch.exp(r + ctx.shift))
        return grad * torch.where(r == 0, torch.zeros_like(dh), dh), None


def relative_receding_penalty_per_channel(weight: Tensor, shift: float = 0.0) -> Tensor:
    """The receding penalty on layer-relative importances, per channel; values in (0, 1].

    ``u_c = sigmoid(w_c) / max_j sigmoid(w_j)`` (over every element of ``weight``, computed as
    ``exp(logsigmoid(w_c) - max_j logsigmoid(w_j))``), ``t_c = sigmoid(logit(u_c) + shift)``
    (``= u_c e^shift / (1 - u_c + u_c e^shift)``, so ``t ~ u e^shift`` for receded channels, as
    the paper's ``sigmoid(w + shift) ~ sigmoid(w) e^shift``), term ``t_c (1 - log t_c)``.

    It depends on ``weight`` only through the ratios ``u``: multiplying every ``sigmoid(w_c)``
    of the layer by one factor (the common-scale direction ``dw_c = d(log a) / (1 - s_c)``)
    changes nothing, so its gradient along that direction is zero and descent cannot lower the
    penalty by shrinking the whole layer. The top channel's own term is 1 with zero derivative;
    through the maximum, the top logit receives ``-(1 - s_top) * sum_c dh_c/dr_c <= 0`` (the
    others pushed down relative to it is the same as it being pulled up; bounded by
    ``sigmoid <= 1``). Stable: finite values and gradients for every finite ``weight``.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    shift = _check_shift(shift)
    log_s = F.logsigmoid(weight)
    return _RelativePenalty.apply(log_s - log_s.amax(), shift)


class _SegmentedRelativePenalty(torch.autograd.Function):
    """``sum_c k_c h_c`` over the channels of many layers stored end to end in one vector.

    ``h_c`` is :class:`_RelativePenalty`'s term of ``r_c = logsigmoid(w_c) - M_l``, ``M_l`` the
    maximum of ``logsigmoid(w)`` over channel ``c``'s layer ``l = layer[c]`` (a segment
    ``amax``). One autograd node with a hand-written backward, so that the number of ATen
    operations (kernel launches on a GPU) is the same for 1 layer or 100. Backward, as autograd
    computes it through the per-layer formula (the maximum's gradient shared equally between
    tied channels)::

        a_c = g k_c dh/dr_c,     dw_c = sigmoid(-w_c) * (a_c - [r_c = 0] / n_l * sum_{j in l} a_j)

    with ``n_l`` the number of channels of layer ``l`` at its maximum.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, layer: Tensor, num_layers: int, shift: float, cost: Tensor | None) -> Tensor:
        log_s = F.logsigmoid(weight)
        top = log_s.new_full((num_layers,), float("-inf")).scatter_reduce_(0, layer, log_s, "amax")
        r = log_s - top.index_select(0, layer)
        one_minus_u = -torch.expm1(r)
        z = r - torch.log(one_minus_u) + shift  # +inf at r = 0: t = 1, h = 1
        h = torch.sigmoid(z) * (1.0 - F.logsigmoid(z))
        # C-element intermediates are kept rather than recomputed: ~10 fewer ops per backward.
        ctx.save_for_backward(weight, layer, cost, r, one_minus_u, z)
        ctx.num_layers = num_layers
        ctx.shift = shift
        return h.sum() if cost is None else torch.dot(h, cost)

    @staticmethod
    @once_differentiable  # the saved intermediates carry no graph: no silent wrong 2nd derivative
    def backward(ctx, grad: Tensor):
        weight, layer, cost, r, one_minus_u, z = ctx.saved_tensors
        dh = -F.logsigmoid(z) * torch.sigmoid(z) / (one_minus_u + torch.exp(r + ctx.shift))
        at_top = r == 0
        a = torch.where(at_top, 0.0, dh) * (grad if cost is None else grad * cost)
        # Through the maximum: the layer's total, shared equally between its tied top channels.
        zeros = a.new_zeros(ctx.num_layers)
        share = zeros.index_add(0, layer, a) / zeros.index_add(0, layer, at_top.to(a.dtype))
        d_log_s = a - torch.where(at_top, share.index_select(0, layer), 0.0)
        return d_log_s * torch.sigmoid(-weight), None, None, None, None


def _segment_layout(sizes, device=None, dtype=None, costs=None) -> tuple[Tensor, Tensor | None]:
    """The layer index of every channel of layers of ``sizes`` stored end to end, and the
    per-layer ``costs`` repeated per channel (``None`` when ``costs`` is ``None``)."""
    counts = torch.tensor(list(sizes), dtype=torch.long)
    layer = torch.repeat_interleave(torch.arange(len(counts)), counts).to(device)
    if costs is None:
        return layer, None
    return layer, torch.repeat_interleave(torch.tensor(list(costs), dtype=dtype), counts).to(device)


def _segmented_relative_receding_penalty(
    weight: Tensor, layer: Tensor, num_layers: int, shift: float = 0.0, cost: Tensor | None = None
) -> Tensor:
    """``sum_c k_c t_c (1 - log t_c)`` over many layers' channels stored end to end in ``weight``.

    ``layer[c]`` is channel ``c``'s layer (``0 <= layer[c] < num_layers``), ``u_c = sigmoid(w_c) /
    max_{j: layer[j] = layer[c]} sigmoid(w_j)``, ``t_c`` as in
    :func:`relative_receding_penalty_per_channel`, ``k_c = cost[c]`` (1 when ``cost`` is None).
    Equals ``sum_l k_l * relative_receding_penalty(w_l, shift)`` (same value and gradient, to
    rounding) in a number of operations that does not grow with the number of layers.
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point Tensor, got {type(weight).__name__}")
    if weight.dim() != 1 or layer.shape != weight.shape:
        raise ValueError(f"weight and layer must be 1-D of one length, got {tuple(weight.shape)} and {tuple(layer.shape)}")
    if cost is not None and cost.shape != weight.shape:
        raise ValueError(f"cost must have weight's shape {tuple(weight.shape)}, got {tuple(cost.shape)}")
    return _SegmentedRelativePenalty.apply(weight, layer, int(num_layers), _check_shift(shift), cost)


def relative_receding_penalty(weight: Tensor, shift: float = 0.0) -> Tensor:
    """``sum_c t_c (1 - log t_c)``, the layer-normalised receding penalty of one layer
    (see :func:`relative_receding_penalty_per_channel`)."""
    return relative_receding_penalty_per_channel(weight, shift).sum()
