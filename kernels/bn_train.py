"""The training-step entry points: the single-pass path where it fits, else the chunked one.

``train_forward`` and ``train_backward`` are what ``rnip_ext.ops`` calls. The cached launch plan
(``_plan.plan``) says whether one program can hold a channel block's whole ``N*H*W`` slice
(``_config.single_pass_config``); if so, one launch each way (2S forward, 3S backward), otherwise
the chunked kernels (statistics partials + combine + normalise, 3S forward; backward partials +
combine + dx, 5S). A ``config=`` argument forces a path: ``single_m > 0`` the single-pass one,
``single_m == 0`` the chunked one.

Every launcher here assumes arguments that ``rnip_ext.ops`` checked (the one place arguments are
validated): ``[N, C, *]`` float inputs, contiguous ``[C]`` vectors on the same device, running
buffers given together.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _plan
from ._config import BNConfig
from ._launch import device_guard, ensure_launchable
from .bn_backward import run_backward_chunked
from .bn_normalize import normalize_launch
from .bn_single import _bn_fwd_single_kernel, run_backward_single, run_forward_single
from .bn_stats import stats_launches

__all__ = ["check_device", "train_forward", "train_backward", "uses_single_pass"]


def check_device(x: Tensor) -> None:
    """A clear ``RuntimeError`` where the kernels cannot run on ``x``'s device (a CPU tensor
    without the Triton interpreter)."""
    ensure_launchable(_bn_fwd_single_kernel, x)


def uses_single_pass(x: Tensor, config: BNConfig | None = None) -> bool:
    """Whether a training step on ``x`` (with ``config``, if given) takes the single-pass path."""
    return _plan.prepared(x, config)[1].single is not None


def train_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, shift: float = 0.0,
                  with_penalty: bool = False, *, running: tuple[Tensor, Tensor] | None = None,
                  momentum: float | None = 0.1, num_batches_tracked: Tensor | None = None,
                  config: BNConfig | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, mean, var, penalty)`` of a training forward, running statistics updated in-kernel.

    ``mean``/``var``: batch mean and biased variance, float32 ``[C]`` (float64 for float64
    ``x``); ``penalty``: ``s (1 - log s)``, ``s = sigmoid(weight + shift)``, when
    ``with_penalty`` and ``weight`` is given, else empty. With ``running`` the buffers move by
    ``momentum`` (``None``: ``1 / num_batches_tracked``) and ``num_batches_tracked`` is
    incremented, as ``nn.BatchNorm2d`` does; an empty batch is counted but moves nothing. One
    launch on the single-pass path, three on the chunked one.
    """
    x, plan = _plan.prepared(x, config)
    if plan.single is not None:
        return run_forward_single(x, plan, weight, bias, eps, shift, with_penalty, running, momentum,
                                  num_batches_tracked)  # fmt: skip
    c, acc, device = plan.shape[1], plan.acc, plan.device
    penalize = bool(with_penalty) and weight is not None
    y = torch.empty_strided(plan.shape, plan.strides, dtype=plan.dtype, device=device)  # empty_as(x), from the plan
    mean = torch.empty(c, dtype=acc, device=device)
    var = torch.empty(c, dtype=acc, device=device)
    penalty = torch.empty(c if penalize else 0, dtype=acc, device=device)
    if c == 0:
        return y, mean, var, penalty
    with device_guard(x):  # one guard for the three launches
        stats_launches(plan.stats, x, c, acc, device, plan.n_pos, weight, shift, mean, var,
                       penalty if penalize else None, running, momentum, num_batches_tracked)  # fmt: skip
        if plan.elementwise is not None:
            normalize_launch(plan.elementwise, x, y, mean, var, weight, bias, eps)
    return y, mean, var, penalty


def train_backward(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                   penalty_grad: Tensor | None, eps: float, shift: float, training: bool,
                   output_mask: tuple[bool, bool, bool] = (True, True, True), *,
                   config: BNConfig | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dw, db)``: one launch on the single-pass path, at most three on the chunked one
    (``bn_backward.backward_chunked`` has the contract)."""
    x, plan = _plan.prepared(x, config)
    run = run_backward_single if plan.single is not None else run_backward_chunked
    return run(x, plan, dy, mean, var, weight, penalty_grad, eps, shift, training, output_mask)
