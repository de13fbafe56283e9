"""Argument checks of the bounded-BN ops: the one place their arguments are validated.

The real kernels (``rnip_ext.kernels``) and the fake (meta) kernels of the ops both call these,
so tracing under ``torch.compile`` fails exactly where running would; the launchers behind them
assume checked arguments. Errors name the argument: ``ValueError`` for shapes, devices, ranges and
layouts, ``TypeError`` for dtypes.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ..kernels._layout import FLOAT_DTYPES

__all__ = ["check_backward", "check_dx", "check_eval", "check_stats", "check_sums", "check_train"]

# Positions per channel the kernels index in int32 (with room for the largest tile).
MAX_POSITIONS = 2**31 - 2**16


def _input(x: Tensor, name: str = "x") -> None:
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, C, *] (at least 2 dims), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] and x.numel() // x.shape[1] > MAX_POSITIONS:
        raise ValueError(f"the bounded-BN kernels take at most {MAX_POSITIONS} positions per channel "
                         f"(N*H*W), got {x.numel() // x.shape[1]} in {name}")  # fmt: skip


def _vector(t: Optional[Tensor], name: str, x: Tensor, *, mutated: bool = False) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must have shape [C] = [{x.shape[1]}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")  # fmt: skip
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if mutated and t.shape[0] > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} is updated in place and must be a contiguous [C] tensor, got stride {t.stride(0)}")


def _scalars(eps: float, shift: float = 0.0) -> None:
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not math.isfinite(shift):
        raise ValueError(f"shift must be finite, got {shift}")


def check_train(x, weight, bias, eps, shift, running_mean=None, running_var=None, num_batches_tracked=None,
                momentum=0.1) -> None:  # fmt: skip
    _input(x)
    _vector(weight, "weight", x)
    _vector(bias, "bias", x)
    _scalars(eps, shift)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    _vector(running_mean, "running_mean", x, mutated=True)
    _vector(running_var, "running_var", x, mutated=True)
    if num_batches_tracked is not None and (num_batches_tracked.numel() != 1
                                            or num_batches_tracked.device != x.device):  # fmt: skip
        raise ValueError("num_batches_tracked must be a one-element tensor on x's device")
    if momentum is None:
        if running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    elif not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")


def check_eval(x, running_mean, running_var, weight, bias, eps) -> None:
    _input(x)
    _vector(running_mean, "running_mean", x)
    _vector(running_var, "running_var", x)
    _vector(weight, "weight", x)
    _vector(bias, "bias", x)
    _scalars(eps)


def check_stats(x, weight, shift) -> None:
    _input(x)
    _vector(weight, "weight", x)
    _scalars(0.0, shift)


def _gradient_inputs(dy, x, mean, var, weight) -> None:
    _input(x)
    _input(dy, "dy")
    if dy.shape != x.shape or dy.device != x.device:
        raise ValueError(f"dy must match x in shape and device: got {tuple(dy.shape)} on {dy.device} "
                         f"for x {tuple(x.shape)} on {x.device}")  # fmt: skip
    _vector(mean, "mean", x)
    _vector(var, "var", x)
    _vector(weight, "weight", x)


def check_backward(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask) -> None:
    _gradient_inputs(dy, x, mean, var, weight)
    _vector(penalty_grad, "penalty_grad", x)
    _scalars(eps, shift)
    if len(output_mask) != 3:
        raise ValueError(f"output_mask must hold 3 booleans (dx, dw, db), got {list(output_mask)}")
    if output_mask[1] and weight is None:
        raise ValueError("output_mask asks for dw but weight is None")
    if penalty_grad is not None and weight is None:
        raise ValueError("penalty_grad given but weight is None (the penalty needs a weight)")


def check_sums(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask) -> None:
    if len(output_mask) != 2:
        raise ValueError(f"output_mask must hold 2 booleans (dw, db), got {list(output_mask)}")
    check_backward(dy, x, mean, var, weight, penalty_grad, eps, shift, [False, *output_mask])


def check_dx(dy, x, mean, var, weight, means, eps) -> None:
    _gradient_inputs(dy, x, mean, var, weight)
    _scalars(eps)
    if means.shape != (2, x.shape[1]) or means.device != x.device or not means.is_floating_point():
        raise ValueError(f"means must be a floating-point [2, C] = [2, {x.shape[1]}] tensor on x's device, "
                         f"got {tuple(means.shape)} {means.dtype} on {means.device}")  # fmt: skip
