"""Elementwise bounded-BN normalisation, shared by training (batch stats) and eval (running stats).

Per channel ``c``, with ``a_c = sigmoid(w_c)`` (1 without weight) and ``b_c`` (0 without bias)::

    A_c = a_c * rsqrt(var_c + eps)            y = (x - mean_c) * A_c + b_c

which is ``y = x * A + B`` with ``B = b - mean * A``, written so that a large ``|mean|`` does not
cancel in low precision. Backward (elsewhere, ``bn_backward``) in eval mode: ``dx = dy * A``.

``_bn_normalize_kernel``, grid ``(position tiles, cdiv(C, BLOCK_C))``: one
``[BLOCK_C, BLOCK_M]`` tile per program (``BLOCK_M`` flat positions, or images x ``BLOCK_HW`` for
NCHW, or for odd ``H*W`` a split tile: vector body plus scalar edges per plane, see
``_launch.position_tiles``); the per-channel ``A``/``b`` are recomputed per program
from ``mean``, ``var``, ``w``, ``b`` (``BLOCK_C`` values, negligible against the tile), which keeps
one launch for the whole eval forward. ``x`` and ``y`` may have different strides.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._config import BNConfig
from ._launch import (
    RUNTIME_SIZES,
    check_positions,
    device_guard,
    ensure_launchable,
    kernel_ready,
    layout_config,
    position_tiles,
    tl_dtype,
    vector,
    view3,
)
from ._layout import alloc_like
from ._math import (
    channel_tile_offsets,
    scale_and_shift,
    split_offsets,
    split_rows,
    tile_positions,
)

__all__ = ["bn_normalize"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_normalize_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw)
    y_ptr,  # [N, C, HW] output, strides (s_yn, s_yc, s_yhw)
    mean_ptr,  # [C] mean (batch or running)
    var_ptr,  # [C] variance (batch biased, or running)
    w_ptr,  # [C] scale logits (read with HAS_W)
    b_ptr,  # [C] shift (read with HAS_B)
    C,
    HW,
    n_pos,  # N * HW
    eps,
    s_xn,
    s_xc,
    s_xhw,
    s_yn,
    s_yc,
    s_yhw,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_xhw / s_yhw
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr = 1,  # divides HW, s_*n, s_*c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr = 0,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    normalize_tile(x_ptr, y_ptr, w_ptr, b_ptr, mean, var, eps, offs_c, mask_c, pid_m, HW, n_pos, s_xn, s_xc,
                   s_xhw, s_yn, s_yc, s_yhw, BLOCK_M, FLAT, HAS_W, HAS_B, ACC, BLOCK_HW, ALIGN,
                   SPLIT)  # fmt: skip


@triton.jit
def normalize_part(x_ptr, y_ptr, x_off, y_off, mask, mean, scale, b, HAS_B: tl.constexpr,
                    ACC: tl.constexpr):  # fmt: skip
    """``y = (x - mean) * scale (+ b)`` on a 2-D tile or one part (body or edges) of a split
    tile; the per-channel values come broadcastable to it."""
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
    y = (x - mean) * scale
    if HAS_B:
        y = y + b
    tl.store(y_ptr + y_off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normalize_tile(x_ptr, y_ptr, w_ptr, b_ptr, mean, var, eps, offs_c, mask_c, pid_m, HW, n_pos, s_xn, s_xc,
                   s_xhw, s_yn, s_yc, s_yhw, BLOCK_M: tl.constexpr, FLAT: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_HW: tl.constexpr, ALIGN: tl.constexpr,
                   SPLIT: tl.constexpr):  # fmt: skip
    """Program ``pid_m``'s tile of ``y = (x - mean) * rsqrt(var + eps) * sigmoid(w) (+ b)`` for the
    channels ``offs_c``: the normalise step shared by the eval/normalise kernel and the
    normalise-with-combine kernel (tiles as in :func:`_bn_normalize_kernel`)."""
    scale, b, w = scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, HAS_W, HAS_B, ACC)
    if SPLIT:
        n_idx, q, e, mask_n, edge_hw = split_rows(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        xb, mb, xe, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_xn,
                                       s_xc, ALIGN)  # fmt: skip
        yb, _, ye, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_yn, s_yc,
                                     ALIGN)  # fmt: skip
        mean3, scale3, b3 = mean[:, None, None], scale[:, None, None], b[:, None, None]
        normalize_part(x_ptr, y_ptr, xb, yb, mb, mean3, scale3, b3, HAS_B, ACC)
        normalize_part(x_ptr, y_ptr, xe, ye, me, mean3, scale3, b3, HAS_B, ACC)
    else:
        pos_a, pos_b, mask_m = tile_positions(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        mask = mask_c[:, None] & mask_m[None, :]
        x_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_xn, s_xc, s_xhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        y_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_yn, s_yc, s_yhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        normalize_part(x_ptr, y_ptr, x_off, y_off, mask, mean[:, None], scale[:, None],
                        b[:, None], HAS_B, ACC)  # fmt: skip


def bn_normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    out: Tensor | None = None,
    config: BNConfig | None = None,
) -> Tensor:
    """``y = sigmoid(weight) * (x - mean) / sqrt(var + eps) + bias`` per channel of ``x [N, C, *]``.

    ``y`` has ``x``'s dtype and memory format (or is ``out``, any layout whose spatial dims
    collapse, which tests use to pre-poison the output). ``mean``/``var``/``weight``/``bias`` are
    ``[C]`` of any float dtype; ``weight``/``bias`` may be ``None`` (scale 1, no shift).
    """
    x = kernel_ready(x)
    mean, var, weight, bias = vector(mean), vector(var), vector(weight), vector(bias)
    y = alloc_like(x) if out is None else out
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    if n_pos == 0:
        return y
    ensure_launchable(_bn_normalize_kernel, x)
    xv, yv = view3(x), view3(y)
    flat, cfg = layout_config([xv, yv], num_channels, config)
    check_positions(n_pos, cfg.block_m)
    flat, block_hw, align, split, tiles_m = position_tiles([xv, yv], x, num_channels, n_pos,
                                                           flat, cfg)  # fmt: skip
    grid = (tiles_m, triton.cdiv(num_channels, cfg.block_c))
    with device_guard(x):
        _bn_normalize_kernel[grid](
            x, y, mean, var,
            weight if weight is not None else mean,  # any valid pointer when unused
            bias if bias is not None else mean,
            num_channels, n_pos // x.shape[0], n_pos, float(eps),
            *xv.strides(flat), *yv.strides(flat),
            BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, FLAT=int(flat),
            HAS_W=int(weight is not None), HAS_B=int(bias is not None),
            ACC=tl_dtype(x.dtype), BLOCK_HW=block_hw, ALIGN=align, SPLIT=split,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return y
