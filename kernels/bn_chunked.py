"""Chunked training forward in two launches: statistics partials, then normalise-with-combine.

For slices too large for the single-pass path. Launch 1 is ``bn_stats``' partial kernel (per
chunk of positions and channel block: pivot-shifted mean and ``M2``). Launch 2,
``_bn_normalize_combine_kernel``, grid ``(position tiles, cdiv(C, BLOCK_C))`` (flat or image
tiles, see ``_launch.position_tiles``): every
program merges its channels' ``K`` chunk partials (``bn_stats.combine_partials``, chunk order,
Chan merges: deterministic and identical in every program) and normalises its tile::

    y = (x - mean) * sigmoid(w) * rsqrt(var + eps) + b

The programs of the first position tile (``pid_m == 0``) also write ``mean``, ``var``, the
penalty and the running statistics (``_math.update_running``). Re-merging ``K x BLOCK_C``
partials per program costs ``2 K BLOCK_C`` loads from L2 against a tile of ``BLOCK_C x BLOCK_M``
elements (a few percent), and saves a launch and a dependent round trip. Traffic: 3S (the
partials read ``x``, the normalise reads ``x`` and writes ``y``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import BNConfig
from ._launch import (
    RUNTIME_SIZES,
    device_guard,
    ensure_launchable,
    kernel_ready,
    layout_config,
    position_tiles,
    running_args,
    tl_dtype,
    vector,
    view3,
)
from ._layout import acc_dtype, alloc_like
from .bn_normalize import normalize_tile
from .bn_stats import bn_batch_stats, combine_partials, finish_stats, launch_partials

__all__ = ["bn_forward_chunked"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_normalize_combine_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw)
    y_ptr,  # [N, C, HW] output, strides (s_yn, s_yc, s_yhw)
    mean_part_ptr,  # [K, C] chunk means of x - pivot (ACC)
    m2_part_ptr,  # [K, C] chunk sums of squared deviations (ACC)
    pivot_ptr,  # [C] the partials' shift
    w_ptr,  # [C] scale logits (read with HAS_W)
    b_ptr,  # [C] shift (read with HAS_B)
    mean_ptr,  # [C] out (pid_m == 0): batch mean
    var_ptr,  # [C] out (pid_m == 0): biased batch variance
    pen_ptr,  # [C] out (pid_m == 0, WITH_PENALTY): receding penalty
    rmean_ptr,  # [C] running mean (UPDATE_RUNNING)
    rvar_ptr,  # [C] running variance (UPDATE_RUNNING)
    nbt_ptr,  # [] num_batches_tracked: read with CUMULATIVE, incremented with COUNT
    C,
    HW,
    n_pos,  # N * HW >= 1
    K,  # number of chunks >= 1
    CHUNK,  # positions per chunk
    s_xn,
    s_xc,
    s_xhw,
    s_yn,
    s_yc,
    s_yhw,
    eps,
    shift,
    momentum,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLAT: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    WITH_PENALTY: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    COUNT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr = 1,  # divides HW, s_*n, s_*c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr = 0,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if COUNT:
        if (pid_m == 0) & (pid_c == 0):
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
    count, mean_rel, m2 = combine_partials(mean_part_ptr, m2_part_ptr, offs_c, mask_c, C, K,
                                           n_pos, CHUNK, BLOCK_C, BLOCK_K, ACC)  # fmt: skip
    if pid_m == 0:
        mean, var = finish_stats(pivot_ptr, w_ptr, mean_ptr, var_ptr, pen_ptr, rmean_ptr, rvar_ptr,
                                 nbt_ptr, offs_c, mask_c, count, mean_rel, m2, shift, momentum,
                                 WITH_PENALTY, UPDATE_RUNNING, CUMULATIVE, ACC, True)  # fmt: skip
    else:
        mean, var = finish_stats(pivot_ptr, w_ptr, mean_ptr, var_ptr, pen_ptr, rmean_ptr, rvar_ptr,
                                 nbt_ptr, offs_c, mask_c, count, mean_rel, m2, shift, momentum,
                                 WITH_PENALTY, UPDATE_RUNNING, CUMULATIVE, ACC, False)  # fmt: skip

    normalize_tile(x_ptr, y_ptr, w_ptr, b_ptr, mean, var, eps, offs_c, mask_c, pid_m, HW, n_pos, s_xn, s_xc,
                   s_xhw, s_yn, s_yc, s_yhw, BLOCK_M, FLAT, HAS_W, HAS_B, ACC, BLOCK_HW, ALIGN,
                   SPLIT)  # fmt: skip


def bn_forward_chunked(
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
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, penalty)`` of a training forward in two launches (module docstring).

    Same contract as ``bn_single.bn_forward_single``; ``config`` gives the chunked tiles. With no
    positions only the statistics combine runs (``y`` is empty, mean = var = 0).
    """
    x = kernel_ready(x)
    weight, bias = vector(weight), vector(bias)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    if n_pos == 0:
        mean, var, penalty = bn_batch_stats(
            x, weight, shift, with_penalty, running=running, momentum=momentum,
            num_batches_tracked=num_batches_tracked, config=config,
        )  # fmt: skip
        return alloc_like(x), mean, var, penalty
    ensure_launchable(_bn_normalize_combine_kernel, x)
    acc = acc_dtype(x.dtype)
    penalize = bool(with_penalty) and weight is not None
    y = alloc_like(x)
    mean = torch.empty(num_channels, dtype=acc, device=x.device)
    var = torch.empty(num_channels, dtype=acc, device=x.device)
    penalty = torch.empty(num_channels if penalize else 0, dtype=acc, device=x.device)
    rm, rv, nbt, mom, update, cumulative, count = running_args(
        running, momentum, num_batches_tracked, mean, n_pos
    )
    mean_part, m2_part, pivot, chunk, num_chunks, cfg = launch_partials(x, config)
    xv, yv = view3(x), view3(y)
    flat, _ = layout_config([xv, yv], num_channels, cfg)
    flat, block_hw, align, split, tiles_m = position_tiles([xv, yv], x, num_channels, n_pos,
                                                           flat, cfg)  # fmt: skip
    grid = (tiles_m, triton.cdiv(num_channels, cfg.block_c))
    with device_guard(x):
        _bn_normalize_combine_kernel[grid](
            x, y, mean_part, m2_part, pivot,
            weight if weight is not None else mean,  # any valid pointer when unused
            bias if bias is not None else mean,
            mean, var, penalty if penalize else mean,
            rm, rv, nbt,
            num_channels, n_pos // x.shape[0], n_pos, num_chunks, chunk,
            *xv.strides(flat), *yv.strides(flat),
            float(eps), float(shift), mom,
            BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, BLOCK_K=cfg.comb_block_k, FLAT=int(flat),
            HAS_W=int(weight is not None), HAS_B=int(bias is not None),
            WITH_PENALTY=int(penalize), UPDATE_RUNNING=update, CUMULATIVE=cumulative,
            COUNT=count, ACC=tl_dtype(x.dtype), BLOCK_HW=block_hw, ALIGN=align, SPLIT=split,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return y, mean, var, penalty
