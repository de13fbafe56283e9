"""Bounded batch norm as ``torch.library`` custom ops running the Triton kernels.

Three ops, each with a fake (meta) kernel so that they trace under ``torch.compile``/AOTAutograd,
and the first two with an autograd formula that calls the third::

    rnip_ext::bounded_bn_train(Tensor x, Tensor? weight, Tensor? bias, float eps, float shift,
                               bool with_penalty) -> (Tensor y, Tensor mean, Tensor var,
                                                      Tensor penalty)
    rnip_ext::bounded_bn_train_update(<the same>, Tensor(a!)? running_mean,
                                      Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked,
                                      float? momentum) -> <the same>
    rnip_ext::bounded_bn_eval(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight,
                              Tensor? bias, float eps) -> Tensor
    rnip_ext::bounded_bn_backward(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight,
                                  Tensor? penalty_grad, float eps, float shift, bool training,
                                  bool[] output_mask) -> (Tensor dx, Tensor dw, Tensor db)

and, for ``SyncBoundedBatchNorm2d`` (whose ``autograd.Function`` puts its collectives between
them; no autograd formula of their own)::

    rnip_ext::bounded_bn_stats(Tensor x, Tensor? weight, float shift, bool with_penalty)
        -> (Tensor mean, Tensor var, Tensor penalty)                 (local statistics)
    rnip_ext::bounded_bn_backward_sums(Tensor dy, Tensor x, Tensor mean, Tensor var,
        Tensor? weight, Tensor? penalty_grad, float eps, float shift, bool[] output_mask)
        -> (Tensor sums, Tensor dw, Tensor db)     (sums [2, C]: sum(dy), sum(dy * xhat))
    rnip_ext::bounded_bn_backward_dx(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight,
        Tensor means, float eps) -> Tensor dx     (means [2, C]: the global mean gradients)

with ``y = sigmoid(weight) * (x - mean) / sqrt(var + eps) + bias`` per channel of ``x [N, C, *]``
and ``penalty = s * (1 - log s)``, ``s = sigmoid(weight + shift)`` (see ``rnip_ext.functional``).

Contract of ``bounded_bn_train``:

* ``y``: ``x``'s dtype, shape and memory format (NCHW and channels_last are read and written in
  place, never copied).
* ``mean``, ``var``: the batch mean and *biased* variance, float32 ``[C]`` (float64 for a float64
  ``x``), marked non-differentiable: gradients flowing into them are ignored. With no positions
  (``n == 0``) both are zeros (no NaN) and ``y`` is empty.
* running statistics (``bounded_bn_train_update``), updated *inside the kernels* (declared with
  ``mutates_args``; autograd through ``bounded_batch_norm_train``): with
  ``running_mean``/``running_var`` given, ``running += f * (batch - running)`` with the unbiased
  variance ``var * n / (n - 1)`` (``n = x.numel() // C``) and ``f = momentum``, or
  ``f = 1 / num_batches_tracked`` when ``momentum`` is ``None`` (cumulative average); and
  ``num_batches_tracked`` (if given) is incremented first -- exactly ``nn.BatchNorm2d``'s
  training step, with no host synchronisation and no per-step host-to-device copy. An empty
  batch is counted but moves no statistics.
* ``penalty``: the per-channel receding penalty (same dtype as ``mean``) when ``with_penalty`` and
  ``weight`` is given, else an empty ``[0]`` tensor. Its gradient flows into ``weight`` through the
  fused backward (``dw += g * dR/dw``), so a loss may use ``penalty.sum()`` directly.

``bounded_bn_eval`` normalises with the running statistics, which it treats as constants (no
gradient). ``bounded_bn_backward`` returns empty ``[0]`` tensors for the gradients that
``output_mask`` (``[dx, dw, db]``) does not ask for; ``dw``/``db`` come in the statistics dtype.
Double backward is not supported.

Paths: ``rnip_ext.kernels.train_forward`` runs a training step single-pass (one launch each way)
when a channel block's whole ``N*H*W`` slice fits on chip, else chunked (``kernels/_config.py``).

The wrappers and autograd formulas call each op's ``.default`` overload (what
``torch.ops.rnip_ext.<op>(...)`` resolves to, one Python call less per step). Arguments are
checked here, once, for the real and the fake kernels alike (``_checks``); the
kernels' launchers assume them valid. The ops need Triton (imported lazily: this module imports
without it, and raises a ``RuntimeError`` naming ``pip install triton`` only when an op actually
runs). On CPU tensors they need the Triton interpreter (``TRITON_INTERPRET=1`` before
``rnip_ext.kernels`` is imported).
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import kernels
from .._backend import require_triton
from ..kernels._layout import acc_dtype, alloc_like
from ._checks import check_backward, check_dx, check_eval, check_stats, check_sums, check_train

__all__ = [
    "bounded_bn_train",
    "bounded_bn_train_update",
    "bounded_bn_eval",
    "bounded_bn_backward",
    "bounded_bn_stats",
    "bounded_bn_backward_sums",
    "bounded_bn_backward_dx",
    "bounded_batch_norm_train",
    "bounded_batch_norm_eval",
]


def _kernels(x: Tensor):
    """``rnip_ext.kernels`` (importing Triton on first use), after checking it can run on ``x``."""
    require_triton()
    kernels.check_device(x)
    return kernels


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    """A ``[C]`` input as the kernels index it: unit stride (a no-op for parameters and buffers)."""
    return t if t is None or t.stride(0) == 1 or t.shape[0] <= 1 else t.contiguous()


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the dispatch when ``t`` already has it (``.to`` then returns ``t``)."""
    return t if t.dtype == dtype else t.to(dtype)


def _stats_like(x: Tensor, size) -> Tensor:
    return x.new_empty((size,), dtype=acc_dtype(x.dtype))


# ---------------------------------------------------------------------------------------------
# Training forward.


@torch.library.custom_op("rnip_ext::bounded_bn_train", mutates_args=())
def bounded_bn_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    shift: float,
    with_penalty: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bounded BN on batch statistics: ``(y, mean, var, penalty)`` (see the module docstring)."""
    check_train(x, weight, bias, eps, shift)
    return _kernels(x).train_forward(x, _vec(weight), _vec(bias), eps, shift, with_penalty)


@torch.library.custom_op(
    "rnip_ext::bounded_bn_train_update",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def bounded_bn_train_update(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    shift: float,
    with_penalty: bool,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``bounded_bn_train`` plus the running-statistics update inside its kernels (in place).

    Mutating ops cannot carry an autograd formula: use it through
    :func:`bounded_batch_norm_train`, whose ``autograd.Function`` pairs it with
    ``bounded_bn_backward``.
    """
    check_train(x, weight, bias, eps, shift, running_mean, running_var, num_batches_tracked, momentum)
    running = None if running_mean is None else (running_mean, running_var)
    return _kernels(x).train_forward(x, _vec(weight), _vec(bias), eps, shift, with_penalty, running=running,
                                     momentum=momentum, num_batches_tracked=num_batches_tracked)  # fmt: skip


@bounded_bn_train_update.register_fake
def _bounded_bn_train_update_fake(x, weight, bias, eps, shift, with_penalty, running_mean,
                                  running_var, num_batches_tracked, momentum):  # fmt: skip
    check_train(x, weight, bias, eps, shift, running_mean, running_var, num_batches_tracked, momentum)
    return _bounded_bn_train_fake(x, weight, bias, eps, shift, with_penalty)


@bounded_bn_train.register_fake
def _bounded_bn_train_fake(x, weight, bias, eps, shift, with_penalty):
    check_train(x, weight, bias, eps, shift)
    num_channels = x.shape[1]
    penalized = with_penalty and weight is not None
    return (
        alloc_like(x),
        _stats_like(x, num_channels),
        _stats_like(x, num_channels),
        _stats_like(x, num_channels if penalized else 0),
    )


def _train_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, shift, with_penalty = inputs
    _, mean, var, _ = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(x, mean, var, weight)
    ctx.eps = eps
    ctx.shift = shift
    ctx.penalized = bool(with_penalty) and weight is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _train_backward(ctx, dy, dmean, dvar, dpenalty):
    # dmean/dvar are ignored: mean and var are non-differentiable outputs.
    x, mean, var, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if dy is None:
        dy = torch.zeros_like(x)
    g = dpenalty if (ctx.penalized and need_w and dpenalty is not None) else None
    dx, dw, db = torch.ops.rnip_ext.bounded_bn_backward.default(
        dy, x, mean, var, weight, g, ctx.eps, ctx.shift, True, [need_x, need_w, need_b]
    )
    return (
        dx if need_x else None,
        _as_dtype(dw, weight.dtype) if need_w else None,
        _as_dtype(db, ctx.bias_dtype) if need_b else None,
        None,
        None,
        None,
    )


bounded_bn_train.register_autograd(_train_backward, setup_context=_train_setup_context)


# ---------------------------------------------------------------------------------------------
# Eval forward.


@torch.library.custom_op("rnip_ext::bounded_bn_eval", mutates_args=())
def bounded_bn_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """Bounded BN on running statistics (constants): one elementwise pass."""
    check_eval(x, running_mean, running_var, weight, bias, eps)
    return _kernels(x).normalize(x, _vec(running_mean), _vec(running_var), _vec(weight), _vec(bias), eps)


@bounded_bn_eval.register_fake
def _bounded_bn_eval_fake(x, running_mean, running_var, weight, bias, eps):
    check_eval(x, running_mean, running_var, weight, bias, eps)
    return alloc_like(x)


def _eval_setup_context(ctx, inputs, output) -> None:
    x, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _eval_backward(ctx, dy):
    x, running_mean, running_var, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_w, need_b = need[0], need[3], need[4]
    dx, dw, db = torch.ops.rnip_ext.bounded_bn_backward.default(
        dy, x, running_mean, running_var, weight, None, ctx.eps, 0.0, False,
        [need_x, need_w, need_b],
    )  # fmt: skip
    return (
        dx if need_x else None,
        None,  # running statistics are constants
        None,
        _as_dtype(dw, weight.dtype) if need_w else None,
        _as_dtype(db, ctx.bias_dtype) if need_b else None,
        None,
    )


bounded_bn_eval.register_autograd(_eval_backward, setup_context=_eval_setup_context)


# ---------------------------------------------------------------------------------------------
# Backward (an op of its own, so that the backward graph traces too).


@torch.library.custom_op("rnip_ext::bounded_bn_backward", mutates_args=())
def bounded_bn_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    penalty_grad: Optional[Tensor],
    eps: float,
    shift: float,
    training: bool,
    output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` of bounded BN, the penalty gradient ``g * dR/dw`` fused into ``dw``."""
    check_backward(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask)
    return _kernels(x).train_backward(dy, x, _vec(mean), _vec(var), _vec(weight), penalty_grad, eps, shift,
                                      training, tuple(output_mask))  # fmt: skip


@bounded_bn_backward.register_fake
def _bounded_bn_backward_fake(
    dy, x, mean, var, weight, penalty_grad, eps, shift, training, output_mask
):
    check_backward(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask)
    num_channels = x.shape[1]
    need_dx, need_dw, need_db = output_mask
    return (
        alloc_like(x) if need_dx else x.new_empty((0,)),
        _stats_like(x, num_channels if need_dw else 0),
        _stats_like(x, num_channels if need_db else 0),
    )


# ---------------------------------------------------------------------------------------------
# The pieces of SyncBoundedBatchNorm2d: local statistics, local sums, dx from global means.


@torch.library.custom_op("rnip_ext::bounded_bn_stats", mutates_args=())
def bounded_bn_stats(x: Tensor, weight: Optional[Tensor], shift: float, with_penalty: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """This process's batch ``(mean, var, penalty)`` (``var`` biased; ``penalty`` empty unless
    ``with_penalty`` and ``weight``); zeros without positions."""
    check_stats(x, weight, shift)
    return _kernels(x).batch_stats(x, _vec(weight), shift, with_penalty)


@bounded_bn_stats.register_fake
def _bounded_bn_stats_fake(x, weight, shift, with_penalty):
    check_stats(x, weight, shift)
    c = x.shape[1]
    return _stats_like(x, c), _stats_like(x, c), _stats_like(x, c if with_penalty and weight is not None else 0)


@torch.library.custom_op("rnip_ext::bounded_bn_backward_sums", mutates_args=())
def bounded_bn_backward_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                             penalty_grad: Optional[Tensor], eps: float, shift: float,
                             output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(sums, dw, db)``: ``sums`` ``[2, C]`` = local ``sum(dy)``, ``sum(dy * xhat)`` (``xhat`` from
    the given, global, statistics) and the local ``dw`` (penalty gradient fused) and ``db``
    (``output_mask = [dw, db]``; empty when not asked)."""
    check_sums(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask)
    return _kernels(x).backward_sums(dy, x, _vec(mean), _vec(var), _vec(weight), penalty_grad, eps, shift,
                                     bool(output_mask[0]), bool(output_mask[1]))  # fmt: skip


@bounded_bn_backward_sums.register_fake
def _bounded_bn_backward_sums_fake(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask):
    check_sums(dy, x, mean, var, weight, penalty_grad, eps, shift, output_mask)
    c = x.shape[1]
    return (x.new_empty((2, c), dtype=acc_dtype(x.dtype)), _stats_like(x, c if output_mask[0] else 0),
            _stats_like(x, c if output_mask[1] else 0))  # fmt: skip


@torch.library.custom_op("rnip_ext::bounded_bn_backward_dx", mutates_args=())
def bounded_bn_backward_dx(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], means: Tensor,
                           eps: float) -> Tensor:  # fmt: skip
    """``dx = sigmoid(w) invstd (dy - means[0] - xhat means[1])`` with given (global) means of
    ``dy`` and ``dy * xhat``."""
    check_dx(dy, x, mean, var, weight, means, eps)
    return _kernels(x).backward_dx(dy, x, _vec(mean), _vec(var), _vec(weight), means.contiguous(), eps)


@bounded_bn_backward_dx.register_fake
def _bounded_bn_backward_dx_fake(dy, x, mean, var, weight, means, eps):
    check_dx(dy, x, mean, var, weight, means, eps)
    return alloc_like(x)


# ---------------------------------------------------------------------------------------------
# Convenience wrappers.


def bounded_batch_norm_train(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    shift: float = 0.0,
    with_penalty: bool = False,
    running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None,
    num_batches_tracked: Optional[Tensor] = None,
    momentum: Optional[float] = 0.1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, penalty)`` of bounded BN on batch statistics, through the Triton op.

    With ``running_mean``/``running_var`` the op updates them in place (and increments
    ``num_batches_tracked``) as ``nn.BatchNorm2d`` does in training, ``momentum=None`` meaning a
    cumulative average. ``penalty`` is empty unless ``with_penalty`` and ``weight`` is given.
    """
    if running_mean is None and num_batches_tracked is None:
        return torch.ops.rnip_ext.bounded_bn_train.default(
            x, weight, bias, float(eps), float(shift), bool(with_penalty)
        )
    return _TrainWithRunningStats.apply(
        x, weight, bias, float(eps), float(shift), bool(with_penalty),
        running_mean, running_var, num_batches_tracked,
        None if momentum is None else float(momentum),
    )  # fmt: skip


class _TrainWithRunningStats(torch.autograd.Function):
    """``bounded_bn_train_update`` (mutating, so no op-level autograd) with the same backward as
    ``bounded_bn_train``: ``bounded_bn_backward``, the penalty gradient fused into ``dw``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, shift, with_penalty, running_mean, running_var,
                num_batches_tracked, momentum):  # fmt: skip
        out = torch.ops.rnip_ext.bounded_bn_train_update.default(
            x, weight, bias, eps, shift, with_penalty, running_mean, running_var,
            num_batches_tracked, momentum,
        )  # fmt: skip
        _train_setup_context(ctx, (x, weight, bias, eps, shift, with_penalty), out)
        # Unused outputs' gradients stay None: no zero tensors are made for them.
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dy, dmean, dvar, dpenalty):
        return _train_backward(ctx, dy, dmean, dvar, dpenalty) + (None,) * 4


def bounded_batch_norm_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """Bounded BN on running statistics, through the Triton op."""
    return torch.ops.rnip_ext.bounded_bn_eval.default(
        x, running_mean, running_var, weight, bias, float(eps)
    )
