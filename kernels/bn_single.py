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
incremented first (by program 0 with ``COUNT``; by the launcher for ``momentum=None``)::

    f = momentum  (or 1 / num_batches_tracked with CUMULATIVE, i.e. momentum=None)
    running_mean += f * (mean - running_mean)
    running_var  += f * (var * n / (n - 1) - running_var)        (unbiased; n = 1: var)

All arithmetic in ``ACC`` (fp32, fp64 for fp64 input). ``SLICE_M`` is a power of two >= ``n``
(a tile shape; the batch size itself is a runtime argument, so a new batch size recompiles only
when its slice crosses a power of two). NCHW slices whose images each fit one power-of-two row
(``N * next_pow2(H*W) <= SLICE_M``, e.g. CIFAR's 2x2/4x4/8x8) hold the tile as images x
``BLOCK_HW`` positions so the loads vectorise (``_launch.slice_tiles``); odd ``H*W`` (7x7) as
split tiles (``[BLOCK_C, images, BLOCK_HW]`` aligned bodies loaded as vectors plus
``[BLOCK_C, images, 2 ALIGN]`` scalar head/tail lanes, ``_math.split_offsets``); others stay flat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import BNConfig, single_pass_config
from ._launch import (
    RUNTIME_SIZES,
    channels_contiguous,
    check_positions,
    device_guard,
    ensure_launchable,
    kernel_ready,
    running_args,
    slice_tiles,
    tl_dtype,
    vector,
    view3,
)
from ._layout import acc_dtype, alloc_like
from ._math import (
    channel_sum,
    channel_tile_offsets,
    scale_and_shift,
    sigmoid_parts,
    split_offsets,
    split_rows,
    tile_positions,
    update_running,
)

__all__ = ["bn_forward_single", "bn_backward_single", "single_config_for"]

@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_fwd_single_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw)
    y_ptr,  # [N, C, HW] output, strides (s_yn, s_yc, s_yhw)
    w_ptr,  # [C] scale logits (read with HAS_W)
    b_ptr,  # [C] shift (read with HAS_B)
    mean_ptr,  # [C] out: batch mean (ACC)
    var_ptr,  # [C] out: biased batch variance (ACC)
    pen_ptr,  # [C] out: receding penalty (written with WITH_PENALTY)
    rmean_ptr,  # [C] running mean, updated in place with UPDATE_RUNNING
    rvar_ptr,  # [C] running variance, updated in place with UPDATE_RUNNING
    nbt_ptr,  # [] num_batches_tracked: read with CUMULATIVE, incremented with COUNT
    C,
    HW,
    n_pos,  # N * HW, 1 <= n_pos <= SLICE_M
    s_xn,
    s_xc,
    s_xhw,
    s_yn,
    s_yc,
    s_yhw,
    eps,
    shift,  # penalty shift: s = sigmoid(w + shift)
    momentum,
    BLOCK_C: tl.constexpr,
    SLICE_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_xhw / s_yhw
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    WITH_PENALTY: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,  # f = 1 / num_batches_tracked (already incremented)
    COUNT: tl.constexpr,  # program 0 increments num_batches_tracked
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr = 1,  # divides HW, s_*n, s_*c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr = 0,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if COUNT:
        if pid_c == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    n = n_pos.to(ACC)
    if SPLIT:
        # Body [BLOCK_C, images, BLOCK_HW] (vector loads) and edges [BLOCK_C, images, 2 ALIGN].
        n_idx, q, e, mask_n, edge_hw = split_rows(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        xb_off, mb, xe_off, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW,
                                               s_xn, s_xc, ALIGN)  # fmt: skip
        yb_off, _, ye_off, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW,
                                             s_yn, s_yc, ALIGN)  # fmt: skip
        xb = tl.load(x_ptr + xb_off, mask=mb, other=0.0).to(ACC)
        xe = tl.load(x_ptr + xe_off, mask=me, other=0.0).to(ACC)
        mean = (channel_sum(xb) + channel_sum(xe)) / n
        xmu_b = tl.where(mb, xb - mean[:, None, None], 0.0)
        xmu_e = tl.where(me, xe - mean[:, None, None], 0.0)
        var = (channel_sum(xmu_b * xmu_b) + channel_sum(xmu_e * xmu_e)) / n
        scale, b, w = scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, HAS_W, HAS_B, ACC)
        yb = xmu_b * scale[:, None, None]
        ye = xmu_e * scale[:, None, None]
        if HAS_B:
            yb = yb + b[:, None, None]
            ye = ye + b[:, None, None]
        tl.store(y_ptr + yb_off, yb.to(y_ptr.dtype.element_ty), mask=mb)
        tl.store(y_ptr + ye_off, ye.to(y_ptr.dtype.element_ty), mask=me)
    else:
        pos_a, pos_b, mask_m = tile_positions(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        mask = mask_c[:, None] & mask_m[None, :]
        x_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_xn, s_xc, s_xhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / n
        xmu = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xmu * xmu, axis=1) / n
        scale, b, w = scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, HAS_W, HAS_B, ACC)
        y = xmu * scale[:, None]
        if HAS_B:
            y = y + b[:, None]
        y_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_yn, s_yc, s_yhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)

    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    if WITH_PENALTY:  # (HAS_W is implied)
        s, _, log_s = sigmoid_parts(w + shift)
        tl.store(pen_ptr + offs_c, s * (1.0 - log_s), mask=mask_c)
    if UPDATE_RUNNING:
        update_running(rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c, mean, var, n, momentum,
                       CUMULATIVE, ACC)  # fmt: skip


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_single_kernel(
    dy_ptr,  # [N, C, HW] output gradient, strides (s_dn, s_dc, s_dhw)
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw)
    dx_ptr,  # [N, C, HW] out: input gradient, strides (s_gn, s_gc, s_ghw) (WRITE_DX)
    mean_ptr,  # [C] mean the forward used (batch or running)
    var_ptr,  # [C] variance the forward used
    w_ptr,  # [C] scale logits (read with HAS_W)
    g_ptr,  # [C] upstream gradient of the penalty, stride s_g (read with HAS_G)
    dw_ptr,  # [C] out: weight gradient (WRITE_DW)
    db_ptr,  # [C] out: bias gradient (WRITE_DB)
    C,
    HW,
    n_pos,  # N * HW, 1 <= n_pos <= SLICE_M
    s_dn,
    s_dc,
    s_dhw,
    s_xn,
    s_xc,
    s_xhw,
    s_gn,
    s_gc,
    s_ghw,
    s_g,  # stride of g (0 for the expanded gradient of penalty.sum())
    eps,
    shift,
    BLOCK_C: tl.constexpr,
    SLICE_M: tl.constexpr,
    FLAT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_G: tl.constexpr,  # add the penalty term (needs WRITE_DW)
    WRITE_DX: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
    TRAINING: tl.constexpr,  # 1: batch statistics, 0: running statistics (constants)
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr = 1,  # divides HW, s_*n, s_*c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr = 0,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    invstd = tl.rsqrt(var + eps)
    scale = invstd
    if HAS_W:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, one_minus_a, _ = sigmoid_parts(w)
        scale = scale * a
    n = n_pos.to(ACC)
    if SPLIT:
        # Body [BLOCK_C, images, BLOCK_HW] (vector loads) and edges [BLOCK_C, images, 2 ALIGN].
        n_idx, q, e, mask_n, edge_hw = split_rows(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        db_off, mb, de_off, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW,
                                               s_dn, s_dc, ALIGN)  # fmt: skip
        dyb = tl.load(dy_ptr + db_off, mask=mb, other=0.0).to(ACC)
        dye = tl.load(dy_ptr + de_off, mask=me, other=0.0).to(ACC)
        sum_dy = channel_sum(dyb) + channel_sum(dye)
        if TRAINING or WRITE_DW:
            mean3 = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None, None]
            xb_off, _, xe_off, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW,
                                                 s_xn, s_xc, ALIGN)  # fmt: skip
            xb = tl.load(x_ptr + xb_off, mask=mb, other=0.0).to(ACC)
            xe = tl.load(x_ptr + xe_off, mask=me, other=0.0).to(ACC)
            xhat_b = tl.where(mb, xb - mean3, 0.0) * invstd[:, None, None]
            xhat_e = tl.where(me, xe - mean3, 0.0) * invstd[:, None, None]
            sum_dyxhat = channel_sum(dyb * xhat_b) + channel_sum(dye * xhat_e)
        if WRITE_DX:
            scale3 = scale[:, None, None]
            if TRAINING:
                mdy3 = (sum_dy / n)[:, None, None]
                mdx3 = (sum_dyxhat / n)[:, None, None]
                dxb = scale3 * (dyb - mdy3 - xhat_b * mdx3)
                dxe = scale3 * (dye - mdy3 - xhat_e * mdx3)
            else:
                dxb = scale3 * dyb
                dxe = scale3 * dye
            gb_off, _, ge_off, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW,
                                                 s_gn, s_gc, ALIGN)  # fmt: skip
            tl.store(dx_ptr + gb_off, dxb.to(dx_ptr.dtype.element_ty), mask=mb)
            tl.store(dx_ptr + ge_off, dxe.to(dx_ptr.dtype.element_ty), mask=me)
    else:
        pos_a, pos_b, mask_m = tile_positions(0, HW, n_pos, SLICE_M, BLOCK_HW, ALIGN)
        mask = mask_c[:, None] & mask_m[None, :]
        d_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_dn, s_dc, s_dhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(ACC)
        sum_dy = tl.sum(dy, axis=1)
        if TRAINING or WRITE_DW:
            mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
            x_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_xn, s_xc, s_xhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
            x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
            xhat = tl.where(mask, x - mean[:, None], 0.0) * invstd[:, None]
            sum_dyxhat = tl.sum(dy * xhat, axis=1)
        if WRITE_DX:
            if TRAINING:
                dx = scale[:, None] * (dy - (sum_dy / n)[:, None]
                                       - xhat * (sum_dyxhat / n)[:, None])  # fmt: skip
            else:
                dx = scale[:, None] * dy
            g_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_gn, s_gc, s_ghw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
            tl.store(dx_ptr + g_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DW:
        dw = a * one_minus_a * sum_dyxhat
        if HAS_G:
            g = tl.load(g_ptr + offs_c.to(tl.int64) * s_g, mask=mask_c, other=0.0).to(ACC)
            s, one_minus_s, log_s = sigmoid_parts(w + shift)
            dw += g * (-log_s * s * one_minus_s)
        tl.store(dw_ptr + offs_c, dw.to(dw_ptr.dtype.element_ty), mask=mask_c)
    if WRITE_DB:
        tl.store(db_ptr + offs_c, sum_dy.to(db_ptr.dtype.element_ty), mask=mask_c)


def single_config_for(x: Tensor, config: BNConfig | None = None) -> BNConfig | None:
    """The single-pass configuration for ``x`` (``config`` if it is one), else ``None``."""
    if config is not None:
        return config if config.single_m else None
    num_channels = x.shape[1]
    if num_channels == 0 or x.numel() == 0:
        return None
    n_pos = x.numel() // num_channels
    xv = view3(kernel_ready(x))
    return single_pass_config(
        n_pos, num_channels, n_pos // x.shape[0], channels_contiguous(xv, num_channels),
        x.element_size(),
    )  # fmt: skip


def _check_single(cfg: BNConfig, n_pos: int) -> None:
    if not 1 <= n_pos <= cfg.single_m:
        raise ValueError(
            f"the single-pass kernels hold at most single_m = {cfg.single_m} positions per "
            f"channel on chip and need at least one, got N*H*W = {n_pos}"
        )
    check_positions(n_pos, cfg.single_m)


def bn_forward_single(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: float = 0.0,
    with_penalty: bool = False,
    *,
    running: tuple[Tensor, Tensor] | None = None,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | None = None,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, penalty)`` of a training forward in one launch (see the module docstring).

    Same contract as ``bn_batch_stats`` followed by ``bn_normalize``. With ``running`` (the
    ``(running_mean, running_var)`` buffers) they are updated in place with ``momentum``, or with
    the cumulative factor ``1 / num_batches_tracked`` when ``momentum`` is ``None``;
    ``num_batches_tracked`` (if given) is incremented, as ``nn.BatchNorm2d`` does. ``config`` must be a single-pass one
    (``single_m >= N*H*W``); by default :func:`_config.single_pass_config` picks it.
    """
    x = kernel_ready(x)
    weight, bias = vector(weight), vector(bias)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    cfg = config if config is not None else single_config_for(x)
    if cfg is None or not cfg.single_m:
        raise ValueError(f"no single-pass configuration for x of shape {tuple(x.shape)}")
    _check_single(cfg, n_pos)
    ensure_launchable(_bn_fwd_single_kernel, x)
    acc = acc_dtype(x.dtype)
    penalize = bool(with_penalty) and weight is not None
    if out is not None:
        y, mean, var, penalty = out
    else:
        y = alloc_like(x)
        mean = torch.empty(num_channels, dtype=acc, device=x.device)
        var = torch.empty(num_channels, dtype=acc, device=x.device)
        penalty = torch.empty(num_channels if penalize else 0, dtype=acc, device=x.device)
    rm, rv, nbt, mom, update, cumulative, count = running_args(
        running, momentum, num_batches_tracked, mean, n_pos
    )
    xv, yv = view3(x), view3(y)
    flat = xv.s_m is not None and yv.s_m is not None
    flat, block_hw, align, split = slice_tiles([xv, yv], x, n_pos, flat, cfg.single_m)
    with device_guard(x):
        _bn_fwd_single_kernel[(triton.cdiv(num_channels, cfg.block_c),)](
            x, y,
            weight if weight is not None else mean,  # any valid pointer when unused
            bias if bias is not None else mean,
            mean, var, penalty if penalize else mean,
            rm, rv, nbt,
            num_channels, n_pos // x.shape[0], n_pos,
            *xv.strides(flat), *yv.strides(flat),
            float(eps), float(shift), mom,
            BLOCK_C=cfg.block_c, SLICE_M=cfg.single_m, FLAT=int(flat),
            HAS_W=int(weight is not None), HAS_B=int(bias is not None),
            WITH_PENALTY=int(penalize), UPDATE_RUNNING=update, CUMULATIVE=cumulative,
            COUNT=count, ACC=tl_dtype(x.dtype), BLOCK_HW=block_hw, ALIGN=align, SPLIT=split,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return y, mean, var, penalty


def bn_backward_single(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    penalty_grad: Tensor | None,
    eps: float,
    shift: float,
    training: bool,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    *,
    out: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)`` in one launch; same contract as ``bn_backward.bn_backward``.

    ``penalty_grad`` may be any ``[C]`` view (a stride-0 expanded gradient is read in place).
    """
    need_dx, need_dw, need_db = (bool(v) for v in output_mask)
    if need_dw and weight is None:
        raise ValueError("bn_backward: output_mask asks for dw but weight is None")
    x = kernel_ready(x)
    dy = kernel_ready(dy)
    mean, var, weight = vector(mean), vector(var), vector(weight)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    cfg = config if config is not None else single_config_for(x)
    if cfg is None or not cfg.single_m:
        raise ValueError(f"no single-pass configuration for x of shape {tuple(x.shape)}")
    _check_single(cfg, n_pos)
    ensure_launchable(_bn_bwd_single_kernel, x)
    acc = acc_dtype(x.dtype)
    dev = x.device
    given = out if out is not None else (None, None, None)
    dx = (given[0] if given[0] is not None else alloc_like(x)) if need_dx else x.new_empty(0)
    dw = given[1] if given[1] is not None else torch.empty(num_channels if need_dw else 0, dtype=acc, device=dev)
    db = given[2] if given[2] is not None else torch.empty(num_channels if need_db else 0, dtype=acc, device=dev)
    has_g = need_dw and penalty_grad is not None
    if not (need_dx or need_dw or need_db):
        return dx, dw, db
    dv, xv = view3(dy), view3(x)
    gv = view3(dx) if need_dx else xv
    flat = all(v.s_m is not None for v in (dv, xv, gv))
    flat, block_hw, align, split = slice_tiles([xv, dv, gv], x, n_pos, flat, cfg.single_m)
    with device_guard(x):
        _bn_bwd_single_kernel[(triton.cdiv(num_channels, cfg.block_c),)](
            dy, x, dx if need_dx else x, mean, var,
            weight if weight is not None else var,  # any valid pointer when unused
            penalty_grad if has_g else var,
            dw if need_dw else var, db if need_db else var,
            num_channels, n_pos // x.shape[0], n_pos,
            *dv.strides(flat), *xv.strides(flat), *gv.strides(flat),
            penalty_grad.stride(0) if has_g else 0,
            float(eps), float(shift),
            BLOCK_C=cfg.block_c, SLICE_M=cfg.single_m, FLAT=int(flat),
            HAS_W=int(weight is not None), HAS_G=int(has_g), WRITE_DX=int(need_dx),
            WRITE_DW=int(need_dw), WRITE_DB=int(need_db), TRAINING=int(bool(training)),
            ACC=tl_dtype(x.dtype), BLOCK_HW=block_hw, ALIGN=align, SPLIT=split,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return dx, dw, db
