"""Single-pass bounded BN: one program owns a channel block and its whole ``N*H*W`` slice.

When the slice fits on chip (``_config.single_pass_config`` decides), a training step is one
launch each way at the minimal memory traffic (S = one activation tensor's bytes):

* forward, ``_bn_fwd_single_kernel``, grid ``(cdiv(C, BLOCK_C),)``: reads ``x`` once into a
  ``[BLOCK_C, SLICE_M]`` register tile, computes the exact mean and biased variance per channel
  by two passes over the tile (``mean = sum(x) / n``, ``var = sum((x - mean)^2) / n``: no
  ``E[x^2] - E[x]^2``), writes ``y = (x - mean) * sigmoid(w) * rsqrt(var + eps) + b``, the batch
  statistics, the receding penalty ``s * (1 - log s)`` (``s = sigmoid(w + shift)``) and, with
  ``UPDATE_RUNNING``, the running statistics (2S);
* backward, ``_bn_bwd_single_kernel``, same grid: reads ``x`` and ``dy`` once, reduces
  ``sum(dy)`` and ``sum(dy * xhat)`` on chip, writes ``dx``, ``dw`` with the penalty gradient
  ``g * (-log s) s (1 - s)`` fused, and ``db`` (3S)::

      dx (train) = a * invstd * (dy - sum_dy / n - xhat * sum_dyxhat / n)
      dx (eval)  = a * invstd * dy
      dw         = a * (1 - a) * sum_dyxhat + g * (-log s) * s * (1 - s)
      db         = sum_dy

Running statistics (``UPDATE_RUNNING``), as ``nn.BatchNorm2d``, with ``num_batches_tracked``
incremented first (by program 0 with ``RUNNING == 1``; by the launcher for ``momentum=None``)::

    f = momentum  (or 1 / num_batches_tracked with CUMULATIVE, i.e. momentum=None)
    running_mean += f * (mean - running_mean)
    running_var  += f * (var * n / (n - 1) - running_var)        (unbiased; n = 1: var)

All arithmetic in ``ACC`` (fp32, fp64 for fp64 input). ``SLICE_M`` is a power of two >= ``n``
(a tile shape; the batch size itself is a runtime argument, so a new batch size recompiles only
when its slice crosses a power of two). NCHW slices whose images each fit one power-of-two row
(``N * next_pow2(H*W) <= SLICE_M``, e.g. CIFAR's 2x2/4x4/8x8) hold the tile as images x
``BLOCK_HW`` positions so the loads vectorise (``_plan.slice_tiles``); odd ``H*W`` (7x7) as
split tiles (``[BLOCK_C, images, BLOCK_HW]`` aligned bodies loaded as vectors plus
``[BLOCK_C, images, 2 ALIGN]`` scalar head/tail lanes, ``_math.split_offsets``); others stay flat.
Absent inputs and outputs are ``None`` pointers (compile-time constants), and every
``[N, C, HW]`` tensor of a launch shares ``x``'s strides (``_layout``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _plan
from ._launch import RUNTIME_SIZES, device_guard, running_mode
from ._layout import empty_as, in_layout_of
from ._math import (
    channel_sum,
    channel_tile_offsets,
    count_batch,
    scale_and_shift,
    sigmoid_parts,
    split_offsets,
    split_rows,
    tile_positions,
    update_running,
)

__all__ = ["forward_single", "backward_single", "run_forward_single", "run_backward_single"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_fwd_single_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_n, s_c, s_hw)
    y_ptr,  # [N, C, HW] output, same strides
    w_ptr,  # [C] scale logits; None: scale 1
    b_ptr,  # [C] shift; None: no shift
    mean_ptr,  # [C] out: batch mean (ACC)
    var_ptr,  # [C] out: biased batch variance (ACC)
    pen_ptr,  # [C] out: receding penalty; None: no penalty
    rmean_ptr,  # [C] running mean, updated in place; None: no running statistics
    rvar_ptr,  # [C] running variance, updated in place (with rmean_ptr)
    nbt_ptr,  # [] num_batches_tracked (RUNNING 1: incremented, 2: read)
    C,
    HW,
    n_pos,  # N * HW, 1 <= n_pos <= SLICE_M
    s_n,
    s_c,
    s_hw,
    eps,
    shift,  # penalty shift: s = sigmoid(w + shift)
    momentum,
    BLOCK_C: tl.constexpr,
    SLICE_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_hw
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr,  # divides HW, s_n, s_c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
    RUNNING: tl.constexpr,  # _launch.RUNNING_*: 0 momentum, 1 momentum + count, 2 cumulative
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if rmean_ptr is not None:
        count_batch(nbt_ptr, pid_c, RUNNING)
    n = n_pos.to(ACC)
    if SPLIT:
        # Body [BLOCK_C, images, BLOCK_HW] (vector loads) and edges [BLOCK_C, images, 2 ALIGN].
        n_idx, q, e, mask_n, edge_hw = split_rows(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        body, mb, edge, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_n, s_c, ALIGN)
        xb = tl.load(x_ptr + body, mask=mb, other=0.0).to(ACC)
        xe = tl.load(x_ptr + edge, mask=me, other=0.0).to(ACC)
        mean = (channel_sum(xb) + channel_sum(xe)) / n
        xmu_b = tl.where(mb, xb - mean[:, None, None], 0.0)
        xmu_e = tl.where(me, xe - mean[:, None, None], 0.0)
        var = (channel_sum(xmu_b * xmu_b) + channel_sum(xmu_e * xmu_e)) / n
        scale, b, w = scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, ACC)
        tl.store(y_ptr + body, (xmu_b * scale[:, None, None] + b[:, None, None]).to(y_ptr.dtype.element_ty), mask=mb)
        tl.store(y_ptr + edge, (xmu_e * scale[:, None, None] + b[:, None, None]).to(y_ptr.dtype.element_ty), mask=me)
    else:
        pos_a, pos_b, mask_m = tile_positions(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        mask = mask_c[:, None] & mask_m[None, :]
        off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_n, s_c, s_hw, FLAT, BLOCK_HW, ALIGN)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / n
        xmu = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xmu * xmu, axis=1) / n
        scale, b, w = scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, ACC)
        tl.store(y_ptr + off, (xmu * scale[:, None] + b[:, None]).to(y_ptr.dtype.element_ty), mask=mask)

    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    if pen_ptr is not None:  # (a weight is implied)
        s, _, log_s = sigmoid_parts(w + shift)
        tl.store(pen_ptr + offs_c, s * (1.0 - log_s), mask=mask_c)
    if rmean_ptr is not None:
        update_running(rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c, mean, var, n, momentum, RUNNING == 2, ACC)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_single_kernel(
    dy_ptr,  # [N, C, HW] output gradient, strides (s_n, s_c, s_hw)
    x_ptr,  # [N, C, HW] input, same strides
    dx_ptr,  # [N, C, HW] out: input gradient, same strides; None: not wanted
    mean_ptr,  # [C] mean the forward used (batch or running)
    var_ptr,  # [C] variance the forward used
    w_ptr,  # [C] scale logits; None: scale 1
    g_ptr,  # [C] upstream gradient of the penalty, stride s_g; None: no penalty term
    dw_ptr,  # [C] out: weight gradient; None: not wanted
    db_ptr,  # [C] out: bias gradient; None: not wanted
    C,
    HW,
    n_pos,  # N * HW, 1 <= n_pos <= SLICE_M
    s_n,
    s_c,
    s_hw,
    s_g,  # stride of g (0 for the expanded gradient of penalty.sum())
    eps,
    shift,
    BLOCK_C: tl.constexpr,
    SLICE_M: tl.constexpr,
    FLAT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr,  # divides HW, s_n, s_c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
    TRAINING: tl.constexpr,  # 1: batch statistics, 0: running statistics (constants)
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    invstd = tl.rsqrt(var + eps)
    scale = invstd
    if w_ptr is not None:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, one_minus_a, _ = sigmoid_parts(w)
        scale = scale * a
    n = n_pos.to(ACC)
    NEED_X: tl.constexpr = TRAINING or dw_ptr is not None
    if SPLIT:
        # Body [BLOCK_C, images, BLOCK_HW] (vector loads) and edges [BLOCK_C, images, 2 ALIGN].
        n_idx, q, e, mask_n, edge_hw = split_rows(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        body, mb, edge, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_n, s_c, ALIGN)
        dyb = tl.load(dy_ptr + body, mask=mb, other=0.0).to(ACC)
        dye = tl.load(dy_ptr + edge, mask=me, other=0.0).to(ACC)
        sum_dy = channel_sum(dyb) + channel_sum(dye)
        if NEED_X:
            mean3 = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None, None]
            xb = tl.load(x_ptr + body, mask=mb, other=0.0).to(ACC)
            xe = tl.load(x_ptr + edge, mask=me, other=0.0).to(ACC)
            xhat_b = tl.where(mb, xb - mean3, 0.0) * invstd[:, None, None]
            xhat_e = tl.where(me, xe - mean3, 0.0) * invstd[:, None, None]
            sum_dyxhat = channel_sum(dyb * xhat_b) + channel_sum(dye * xhat_e)
        if dx_ptr is not None:
            scale3 = scale[:, None, None]
            if TRAINING:
                mdy3 = (sum_dy / n)[:, None, None]
                mdx3 = (sum_dyxhat / n)[:, None, None]
                dxb = scale3 * (dyb - mdy3 - xhat_b * mdx3)
                dxe = scale3 * (dye - mdy3 - xhat_e * mdx3)
            else:
                dxb = scale3 * dyb
                dxe = scale3 * dye
            tl.store(dx_ptr + body, dxb.to(dx_ptr.dtype.element_ty), mask=mb)
            tl.store(dx_ptr + edge, dxe.to(dx_ptr.dtype.element_ty), mask=me)
    else:
        pos_a, pos_b, mask_m = tile_positions(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        mask = mask_c[:, None] & mask_m[None, :]
        off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_n, s_c, s_hw, FLAT, BLOCK_HW, ALIGN)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        sum_dy = tl.sum(dy, axis=1)
        if NEED_X:
            mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            xhat = tl.where(mask, x - mean[:, None], 0.0) * invstd[:, None]
            sum_dyxhat = tl.sum(dy * xhat, axis=1)
        if dx_ptr is not None:
            if TRAINING:
                dx = scale[:, None] * (dy - (sum_dy / n)[:, None] - xhat * (sum_dyxhat / n)[:, None])
            else:
                dx = scale[:, None] * dy
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if dw_ptr is not None:
        dw = a * one_minus_a * sum_dyxhat
        if g_ptr is not None:
            g = tl.load(g_ptr + offs_c.to(tl.int64) * s_g, mask=mask_c, other=0.0).to(ACC)
            s, one_minus_s, log_s = sigmoid_parts(w + shift)
            dw += g * (-log_s * s * one_minus_s)
        tl.store(dw_ptr + offs_c, dw.to(dw_ptr.dtype.element_ty), mask=mask_c)
    if db_ptr is not None:
        tl.store(db_ptr + offs_c, sum_dy.to(db_ptr.dtype.element_ty), mask=mask_c)


def forward_single(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, shift: float = 0.0,
                   with_penalty: bool = False, *, running=None, momentum: float | None = 0.1,
                   num_batches_tracked: Tensor | None = None, out=None, config=None):  # fmt: skip
    """``(y, mean, var, penalty)`` of a training forward in one launch (see the module docstring).

    With ``running`` (the ``(running_mean, running_var)`` buffers) they are updated in place with
    ``momentum``, or with the cumulative factor ``1 / num_batches_tracked`` when ``momentum`` is
    ``None``; ``num_batches_tracked`` (if given) is incremented, as ``nn.BatchNorm2d`` does.
    ``config`` must be a single-pass one (``single_m >= N*H*W >= 1``); by default
    ``_config.single_pass_config`` picks it. ``out`` (tests) supplies pre-allocated outputs.
    """
    x, plan = _plan.prepared(x, config)
    return run_forward_single(x, plan, weight, bias, eps, shift, with_penalty, running, momentum,
                              num_batches_tracked, out)  # fmt: skip


def run_forward_single(x, plan, weight, bias, eps, shift, with_penalty, running, momentum, num_batches_tracked,
                       out=None):  # fmt: skip
    """:func:`forward_single` on a prepared ``x`` and its plan (``_plan.prepared``)."""
    s = plan.single
    if s is None:
        raise ValueError(f"no single-pass configuration for x of shape {tuple(x.shape)}")
    penalize = bool(with_penalty) and weight is not None
    if out is not None:
        y, mean, var, penalty = out
        _plan.check_out(y, x)
    else:
        c, acc, device = plan.shape[1], plan.acc, plan.device
        y = torch.empty_strided(plan.shape, plan.strides, dtype=plan.dtype, device=device)  # empty_as(x), from the plan
        mean = torch.empty(c, dtype=acc, device=device)
        var = torch.empty(c, dtype=acc, device=device)
        penalty = torch.empty(c if penalize else 0, dtype=acc, device=device)
    rm, rv, nbt, mode = running_mode(running, momentum, num_batches_tracked, plan.n_pos)
    with device_guard(x):
        _bn_fwd_single_kernel.run(
            x, y, weight, bias, mean, var, penalty if penalize else None, rm, rv, nbt, *s.sizes, float(eps),
            float(shift), 0.0 if momentum is None else float(momentum), *s.consts, mode, grid=s.grid, warmup=False,
            num_warps=s.num_warps,
        )  # fmt: skip
    return y, mean, var, penalty


def backward_single(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                    penalty_grad: Tensor | None, eps: float, shift: float, training: bool,
                    output_mask=(True, True, True), *, out=None, config=None):  # fmt: skip
    """``(dx, dw, db)`` in one launch; same contract as ``bn_backward.backward_chunked``."""
    x, plan = _plan.prepared(x, config)
    return run_backward_single(x, plan, dy, mean, var, weight, penalty_grad, eps, shift, training, output_mask, out)


def run_backward_single(x, plan, dy, mean, var, weight, penalty_grad, eps, shift, training, output_mask,
                        out=None):  # fmt: skip
    """:func:`backward_single` on a prepared ``x`` and its plan (``_plan.prepared``)."""
    s = plan.single
    if s is None:
        raise ValueError(f"no single-pass configuration for x of shape {tuple(x.shape)}")
    need_dx, need_dw, need_db = output_mask
    if dy.stride() != plan.strides:  # in_layout_of's first test, against the plan (host time)
        dy = in_layout_of(dy, x)
    c, acc, device = plan.shape[1], plan.acc, plan.device
    if out is None:
        dx = torch.empty_strided(plan.shape, plan.strides, dtype=plan.dtype, device=device) if need_dx else x.new_empty(0)
        dw = torch.empty(c if need_dw else 0, dtype=acc, device=device)
        db = torch.empty(c if need_db else 0, dtype=acc, device=device)
    else:
        dx = (_plan.check_out(out[0], x) if out[0] is not None else empty_as(x)) if need_dx else x.new_empty(0)
        dw = out[1] if out[1] is not None else torch.empty(c if need_dw else 0, dtype=acc, device=device)
        db = out[2] if out[2] is not None else torch.empty(c if need_db else 0, dtype=acc, device=device)
    if not (need_dx or need_dw or need_db):
        return dx, dw, db
    g = penalty_grad if need_dw else None
    with device_guard(x):
        _bn_bwd_single_kernel.run(
            dy, x, dx if need_dx else None, mean, var, weight, g, dw if need_dw else None, db if need_db else None,
            *s.sizes, 0 if g is None else g.stride(0), float(eps), float(shift), *s.consts, int(bool(training)),
            grid=s.grid, warmup=False, num_warps=s.num_warps,
        )  # fmt: skip
    return dx, dw, db
