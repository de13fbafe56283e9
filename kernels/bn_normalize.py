"""Elementwise bounded-BN normalisation: the eval forward (running statistics), the chunked
training forward's last step (batch statistics) and ``SyncBoundedBatchNorm2d``'s (global ones).

Per channel ``c``, with ``a_c = sigmoid(w_c)`` (1 without weight) and ``b_c`` (0 without bias)::

    A_c = a_c * rsqrt(var_c + eps)            y = (x - mean_c) * A_c + b_c

written so that a large ``|mean|`` does not cancel in low precision. Backward (``bn_backward``) in
eval mode: ``dx = dy * A``.

``_bn_normalize_kernel``, grid ``(position tiles, cdiv(C, BLOCK_C))``: one ``[BLOCK_C, BLOCK_M]``
tile per program (``BLOCK_M`` flat positions, or images x ``BLOCK_HW`` for NCHW, or for odd
``H*W`` a split tile: vector body plus scalar edges per plane, ``_plan.position_tiles``); the
per-channel ``A``/``b`` are recomputed per program from ``mean``, ``var``, ``w``, ``b``
(``BLOCK_C`` values, negligible against the tile). ``x`` and ``y`` share their strides.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import _plan
from ._layout import empty_as
from ._launch import RUNTIME_SIZES, device_guard
from ._math import channel_tile_offsets, scale_and_shift, split_offsets, split_rows, tile_positions

__all__ = ["normalize", "launch_normalize", "normalize_launch"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_normalize_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_n, s_c, s_hw)
    y_ptr,  # [N, C, HW] output, same strides
    mean_ptr,  # [C] mean (batch or running)
    var_ptr,  # [C] variance (batch biased, or running)
    w_ptr,  # [C] scale logits; None: scale 1
    b_ptr,  # [C] shift; None: no shift
    C,
    HW,
    n_pos,  # N * HW
    s_n,
    s_c,
    s_hw,
    eps,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_hw
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr,  # divides HW, s_n, s_c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    scale, b, _ = scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, ACC)
    if SPLIT:
        n_idx, q, e, mask_n, edge_hw = split_rows(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        body, body_mask, edge, edge_mask = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_n,
                                                         s_c, ALIGN)  # fmt: skip
        mean3, scale3, b3 = mean[:, None, None], scale[:, None, None], b[:, None, None]
        _normalize_part(x_ptr, y_ptr, body, body_mask, mean3, scale3, b3, ACC)
        _normalize_part(x_ptr, y_ptr, edge, edge_mask, mean3, scale3, b3, ACC)
    else:
        pos_a, pos_b, mask_m = tile_positions(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_n, s_c, s_hw, FLAT, BLOCK_HW, ALIGN)
        _normalize_part(x_ptr, y_ptr, off, mask_c[:, None] & mask_m[None, :], mean[:, None], scale[:, None],
                        b[:, None], ACC)  # fmt: skip


@triton.jit
def _normalize_part(x_ptr, y_ptr, off, mask, mean, scale, b, ACC: tl.constexpr):
    """``y = (x - mean) * scale + b`` on a 2-D tile or one part (body or edges) of a split tile;
    the per-channel values come broadcastable to it."""
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + off, ((x - mean) * scale + b).to(y_ptr.dtype.element_ty), mask=mask)


def launch_normalize(launch, x: Tensor, y: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> None:
    """Run the normalise ``launch`` (an ``_plan.Launch``) from ``x`` into ``y`` (same strides)."""
    with device_guard(x):
        normalize_launch(launch, x, y, mean, var, weight, bias, eps)


def normalize_launch(launch, x: Tensor, y: Tensor, mean: Tensor, var: Tensor, weight, bias, eps: float) -> None:
    """:func:`launch_normalize` under the caller's ``device_guard(x)``."""
    _bn_normalize_kernel.run(x, y, mean, var, weight, bias, *launch.sizes, float(eps), *launch.consts,
                             grid=launch.grid, warmup=False, num_warps=launch.num_warps)  # fmt: skip


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *,
              out: Tensor | None = None, config=None) -> Tensor:  # fmt: skip
    """``y = sigmoid(weight) * (x - mean) / sqrt(var + eps) + bias`` per channel of ``x [N, C, *]``.

    ``y`` has ``x``'s dtype and layout (``_layout``), or is ``out`` (tests: a
    pre-poisoned buffer with those strides). ``mean``/``var``/``weight``/``bias`` are contiguous
    ``[C]`` of any float dtype; ``weight``/``bias`` may be ``None`` (scale 1, no shift). Arguments
    are those the op ``rnip_ext::bounded_bn_eval`` checked.
    """
    x, plan = _plan.prepared(x, config)
    y = empty_as(x) if out is None else _plan.check_out(out, x)
    if plan.elementwise is not None:
        launch_normalize(plan.elementwise, x, y, mean, var, weight, bias, eps)
    return y
