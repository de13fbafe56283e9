"""Pure functions: the eager (PyTorch-only) reference of everything rnip_ext computes.

This module is the one place the maths lives. The CPU path of :class:`~rnip_ext.BoundedBatchNorm2d`
runs it, the tests compare the Triton kernels against it (in float64) and the benchmarks time it
as "the paper's eager formulation".

Bounded batch normalisation (per channel ``c``, over the ``N*H*W`` positions)::

    y = sigmoid(w_c) * (x - mean_c) / sqrt(var_c + eps) + b_c

Receding penalty (Suteu & Guo, arXiv 2204.06404), with ``s_c = sigmoid(w_c + shift)``::

    R(w) = sum_c s_c * (1 - log s_c)          dR/dw_c = -log(s_c) * s_c * (1 - s_c)  >= 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bounded_batch_norm",
    "bounded_scale",
    "receding_penalty",
    "receding_penalty_per_channel",
    "receding_penalty_grad",
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
