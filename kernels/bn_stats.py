"""Batch statistics of bounded BN (training forward), plus the receding penalty per channel.

Per channel ``c`` over the ``n = N*H*W`` positions::

    mean_c = sum(x) / n            var_c = sum((x - mean_c)^2) / n          (biased)
    p_c    = s * (1 - log s),      s = sigmoid(w_c + shift)                 (with_penalty)

Two kernels:

1. ``_bn_partial_stats_kernel``, grid ``(num_chunks, cdiv(C, BLOCK_C))``: each program reduces a
   chunk of ``CHUNK`` positions (a runtime argument, like every size that changes with the batch) for ``BLOCK_C`` channels to ``(mean_k, M2_k)``; the count of chunk
   ``k`` is ``min(CHUNK, n - k*CHUNK)``, known from its index, so it is not stored. Values are
   first shifted by a per-channel pivot ``x[0, c, 0]`` (exact for values within a factor of two
   of it), so that a large ``|mean|`` costs no precision in the means the merges subtract; chunk
   0's programs write the pivot for the combine. NCHW launches whose ``H*W`` shares a
   power-of-two factor with the strides tile images x rows of ``H*W`` (vector loads) over chunks
   of whole images (``_launch.reduction_tiles``); the others flat positions. Inside the chunk
   every lane of the
   ``[BLOCK_C, BLOCK_M]`` tile keeps its own Welford ``(n, mean, M2)`` (no cross-lane reduction
   in the loop); the lanes are merged once at the end of the chunk with Chan's formula::

       n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,
       M2 = M2_a + M2_b + d^2 * na * nb / n

2. ``_bn_combine_stats_kernel``, grid ``(cdiv(C, COMB_BLOCK_C),)``: merges the chunk partials in
   chunk order (deterministic), ``BLOCK_K`` chunks at a time: their pooled mean
   ``sum(n_k mean_k) / sum(n_k)`` and ``M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2)``, merged into
   the running triple as above; writes ``mean = pivot + mean`` and ``var = M2 / n`` (both ``0``
   when ``n == 0``), with ``WITH_PENALTY`` ``p_c``, and with ``UPDATE_RUNNING`` the running
   statistics (``_math.update_running``), so a chunked training forward is 3 launches in all.

Never ``E[x^2] - E[x]^2``: each merge subtracts means, never sums of squares. All arithmetic in
``ACC`` (fp32, or fp64 for fp64 inputs); inputs of any float dtype are converted on load.
"""

from __future__ import annotations

import torch
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
    reduction_tiles,
    running_args,
    tl_dtype,
    vector,
    view3,
)
from ._layout import acc_dtype
from ._math import aligned, chunk_image_lanes, position_offsets, sigmoid_parts, update_running

__all__ = ["bn_batch_stats", "launch_partials", "combine_partials", "finish_stats"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_partial_stats_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw)
    mean_part_ptr,  # [K, C] chunk means of x - pivot (ACC), row k = chunk k
    m2_part_ptr,  # [K, C] chunk sums of squared deviations (ACC)
    pivot_ptr,  # [C] out (chunk 0's programs): the shift x[0, c, 0] (ACC)
    C,
    HW,
    n_pos,  # N * HW
    s_xn,
    s_xc,
    s_xhw,
    CHUNK,  # positions per chunk, a multiple of BLOCK_M (runtime: no recompiles per batch size)
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_xhw
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles, chunks of whole images (unit H*W stride)
    ALIGN: tl.constexpr = 1,  # divides HW, s_xn, s_xc (image tiles)
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c_off = offs_c.to(tl.int64) * aligned(s_xc, ALIGN)
    # Every program shifts by the same value, the channel's first element.
    pivot = tl.load(x_ptr + c_off, mask=mask_c, other=0.0).to(ACC)
    if pid_k == 0:
        tl.store(pivot_ptr + offs_c, pivot, mask=mask_c)

    lane_n = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    lane_mean = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    lane_m2 = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
    if BLOCK_HW == 0:
        start = pid_k * CHUNK
        end = tl.minimum(start + CHUNK, n_pos)
        # Welford per lane: lane (c, j) sees positions start + j, start + j + BLOCK_M, ...;
        # every lane updated in step i has seen exactly i + 1 values (only the last tile has
        # masked lanes, which skip it), so the update divides by one scalar per step. No
        # cross-lane work in the loop; the lanes are merged once at the end.
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = mask_c[:, None] & (offs_m < end)[None, :]
            m_off = position_offsets(offs_m, HW, s_xn, s_xhw, FLAT)
            x = tl.load(x_ptr + c_off[:, None] + m_off[None, :], mask=mask, other=0.0).to(ACC)
            x = x - pivot[:, None]
            inv = 1.0 / ((m0 - start) // BLOCK_M + 1).to(ACC)
            delta = tl.where(mask, x - lane_mean, 0.0)
            lane_mean += delta * inv
            lane_m2 += delta * tl.where(mask, x - lane_mean, 0.0)
            lane_n += mask.to(ACC)
    else:
        # Image tiles: images [n0, n0 + BLOCK_M // BLOCK_HW) x row block hb of BLOCK_HW
        # positions, over the chunk's whole images. Lanes past H*W in the last row block
        # ("short" lanes) skip it, so before step (g, hb) (g-th image group of the chunk) a
        # lane has seen g * row_blocks + hb values, a short lane g * (row_blocks - 1) + hb:
        # two scalar divisions per step, still none per element. Lanes of missing images in the
        # chunk's last group skip all of its steps and are never updated again.
        hw, row_blocks, n_start, n_end, j_n, j_hw = chunk_image_lanes(pid_k, HW, n_pos, CHUNK, BLOCK_M, BLOCK_HW,
                                                                            ALIGN)  # fmt: skip
        full = (row_blocks - 1) * BLOCK_HW + j_hw < hw
        s_n = aligned(s_xn, ALIGN)
        for n0 in range(n_start, n_end, BLOCK_M // BLOCK_HW):
            n_idx = n0 + j_n
            a_off = n_idx.to(tl.int64) * s_n
            group = (n0 - n_start) // (BLOCK_M // BLOCK_HW)
            for hb in range(0, row_blocks):
                hw_idx = hb * BLOCK_HW + j_hw
                mask = mask_c[:, None] & ((n_idx < n_end) & (hw_idx < hw))[None, :]
                x = tl.load(x_ptr + c_off[:, None] + (a_off + hw_idx)[None, :], mask=mask,
                            other=0.0).to(ACC)  # fmt: skip
                x = x - pivot[:, None]
                inv_full = 1.0 / (group * row_blocks + hb + 1).to(ACC)
                inv_short = 1.0 / (group * (row_blocks - 1) + hb + 1).to(ACC)
                inv = tl.where(full, inv_full, inv_short)
                delta = tl.where(mask, x - lane_mean, 0.0)
                lane_mean += delta * inv[None, :]
                lane_m2 += delta * tl.where(mask, x - lane_mean, 0.0)
                lane_n += mask.to(ACC)
    # Merge the lanes (pooled form of Chan's merge): once per chunk.
    count = tl.sum(lane_n, axis=1)
    mean = tl.sum(lane_n * lane_mean, axis=1) / tl.maximum(count, 1.0)
    dev = tl.where(lane_n > 0.0, lane_mean - mean[:, None], 0.0)
    m2 = tl.sum(lane_m2, axis=1) + tl.sum(lane_n * dev * dev, axis=1)

    out = pid_k.to(tl.int64) * C + offs_c
    tl.store(mean_part_ptr + out, mean, mask=mask_c)
    tl.store(m2_part_ptr + out, m2, mask=mask_c)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_combine_stats_kernel(
    mean_part_ptr,  # [K, C] chunk means of x - pivot (ACC)
    m2_part_ptr,  # [K, C] chunk sums of squared deviations (ACC)
    pivot_ptr,  # [C] the shift of the partial means (zeros when K == 0)
    w_ptr,  # [C] scale logits (read with WITH_PENALTY)
    mean_ptr,  # [C] out: batch mean (ACC)
    var_ptr,  # [C] out: biased batch variance (ACC)
    pen_ptr,  # [C] out: receding penalty s * (1 - log s) (written with WITH_PENALTY)
    rmean_ptr,  # [C] running mean, updated in place with UPDATE_RUNNING
    rvar_ptr,  # [C] running variance, updated in place with UPDATE_RUNNING
    nbt_ptr,  # [] num_batches_tracked: read with CUMULATIVE, incremented with COUNT
    C,
    K,  # number of chunks
    n_pos,  # N * HW
    shift,  # penalty shift: s = sigmoid(w + shift)
    momentum,
    CHUNK,  # positions per chunk (chunk k holds min(CHUNK, n_pos - k*CHUNK))
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_PENALTY: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,  # needs n_pos >= 1
    CUMULATIVE: tl.constexpr,  # f = 1 / num_batches_tracked (already incremented)
    COUNT: tl.constexpr,  # program 0 increments num_batches_tracked
    ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if COUNT:
        if pid_c == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)

    count, mean, m2 = combine_partials(mean_part_ptr, m2_part_ptr, offs_c, mask_c, C, K, n_pos,
                                       CHUNK, BLOCK_C, BLOCK_K, ACC)  # fmt: skip
    finish_stats(pivot_ptr, w_ptr, mean_ptr, var_ptr, pen_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                 offs_c, mask_c, count, mean, m2, shift, momentum, WITH_PENALTY, UPDATE_RUNNING,
                 CUMULATIVE, ACC, True)  # fmt: skip


@triton.jit
def combine_partials(
    mean_part_ptr, m2_part_ptr, offs_c, mask_c, C, K, n_pos, CHUNK,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``(count, mean, M2)`` of channels ``offs_c`` from the ``K`` chunk partials, in chunk order.

    ``mean`` is relative to the pivot (the partials' shift). Used by the combine kernel and by
    the fused normalise-with-combine kernel of the chunked training forward.
    """
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_k[:, None] & mask_c[None, :]
        # Count of each chunk; 0 for rows past the last chunk.
        left = n_pos - offs_k.to(tl.int64) * CHUNK
        n_k = tl.minimum(tl.maximum(left, 0), CHUNK).to(ACC)
        ptr_off = offs_k.to(tl.int64)[:, None] * C + offs_c[None, :]
        mean_k = tl.load(mean_part_ptr + ptr_off, mask=mask, other=0.0)
        m2_k = tl.load(m2_part_ptr + ptr_off, mask=mask, other=0.0)
        # Pool these BLOCK_K chunks (nb >= 1: row k0 is a real chunk) ...
        nb = tl.sum(n_k, axis=0)
        mean_b = tl.sum(n_k[:, None] * mean_k, axis=0) / nb
        dev = mean_k - mean_b[None, :]
        m2_b = tl.sum(m2_k, axis=0) + tl.sum(n_k[:, None] * dev * dev, axis=0)
        # ... and merge the pool into the running triple (Chan).
        total = count + nb
        delta = mean_b - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + m2_b + delta * delta * (count * (nb / total))
        count = total
    return count, mean, m2


@triton.jit
def finish_stats(
    pivot_ptr, w_ptr, mean_ptr, var_ptr, pen_ptr, rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c,
    count, mean, m2, shift, momentum, WITH_PENALTY: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """``(mean, var)`` (absolute mean, biased variance; 0 for no positions); with ``STORE`` also
    writes them, the penalty and the running statistics."""
    var = tl.where(count > 0.0, m2 / tl.maximum(count, 1.0), 0.0)
    pivot = tl.load(pivot_ptr + offs_c, mask=mask_c, other=0.0)
    mean = pivot + mean
    if STORE:
        tl.store(mean_ptr + offs_c, mean, mask=mask_c)
        tl.store(var_ptr + offs_c, var, mask=mask_c)
        if WITH_PENALTY:
            w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
            s, _, log_s = sigmoid_parts(w + shift)
            tl.store(pen_ptr + offs_c, s * (1.0 - log_s), mask=mask_c)
        if UPDATE_RUNNING:
            update_running(rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c, mean, var, count,
                           momentum, CUMULATIVE, ACC)  # fmt: skip
    return mean, var


def bn_batch_stats(
    x: Tensor,
    weight: Tensor | None = None,
    shift: float = 0.0,
    with_penalty: bool = False,
    *,
    running: tuple[Tensor, Tensor] | None = None,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | None = None,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel batch ``mean``, biased ``var`` and receding ``penalty`` of ``x`` ``[N, C, *]``.

    ``mean``/``var`` are float32 (float64 for a float64 ``x``), shape ``[C]``; with no positions
    (``N*H*W == 0``) both are 0. ``penalty`` is ``s * (1 - log s)`` per channel,
    ``s = sigmoid(weight + shift)``, in the same dtype, when ``with_penalty`` and ``weight`` is
    given, else an empty ``[0]`` tensor. ``x`` is read in place for NCHW and channels_last.
    ``out`` (tests) supplies pre-allocated ``[C]`` outputs. With ``running`` (the
    ``(running_mean, running_var)`` buffers) the combine kernel also updates them in place
    (``momentum``, or ``1 / num_batches_tracked`` when it is ``None``), and
    ``num_batches_tracked`` (if given) is incremented; an empty batch moves no statistics but is
    counted, as in ``nn.BatchNorm2d``.
    """
    x = kernel_ready(x)
    weight = vector(weight)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    acc = acc_dtype(x.dtype)
    penalize = bool(with_penalty) and weight is not None
    if out is not None:
        mean, var, penalty = out
    else:
        mean = torch.empty(num_channels, dtype=acc, device=x.device)
        var = torch.empty(num_channels, dtype=acc, device=x.device)
        penalty = torch.empty(num_channels if penalize else 0, dtype=acc, device=x.device)
    if num_channels == 0:
        return mean, var, penalty
    ensure_launchable(_bn_partial_stats_kernel, x)

    parts = launch_partials(x, config)
    mean_part, m2_part, pivot, chunk, num_chunks, cfg = parts
    rm, rv, nbt, mom, update, cumulative, count = running_args(
        running, momentum, num_batches_tracked, mean, n_pos
    )
    with device_guard(x):
        _bn_combine_stats_kernel[(triton.cdiv(num_channels, cfg.comb_block_c),)](
            mean_part, m2_part, pivot,
            weight if penalize else mean,  # any valid pointer when unused
            mean, var, penalty if penalize else mean,
            rm, rv, nbt,
            num_channels, num_chunks, n_pos, float(shift), mom, chunk,
            BLOCK_C=cfg.comb_block_c, BLOCK_K=cfg.comb_block_k,
            WITH_PENALTY=int(penalize), UPDATE_RUNNING=update, CUMULATIVE=cumulative,
            COUNT=count, ACC=tl_dtype(x.dtype), num_warps=4,
        )  # fmt: skip
    return mean, var, penalty


def launch_partials(x: Tensor, config: BNConfig | None):
    """Launch the chunk-partials kernel on ``x`` (``[N, C, *]``, ``C >= 1``, kernel-ready).

    Returns ``(mean_part, m2_part, pivot, chunk, num_chunks, config)`` for a combine; with no
    positions nothing is launched (``num_chunks == 0``, pivot zeros).
    """
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels
    acc = acc_dtype(x.dtype)
    xv = view3(x)
    flat, cfg = layout_config([xv], num_channels, config)
    num_cblocks = triton.cdiv(num_channels, cfg.block_c)
    flat, block_hw, align, _, chunk, num_chunks = reduction_tiles(
        [xv], x, num_channels, n_pos, flat, cfg, num_cblocks)  # fmt: skip
    check_positions(n_pos, chunk)
    # At least one row, so that the combine kernel never gets a zero-size buffer.
    mean_part = torch.empty((max(num_chunks, 1), num_channels), dtype=acc, device=x.device)
    m2_part = torch.empty((max(num_chunks, 1), num_channels), dtype=acc, device=x.device)
    # Written by the partial kernel's first chunk; with no chunks the mean is 0 + 0.
    pivot = (torch.empty if num_chunks else torch.zeros)(num_channels, dtype=acc, device=x.device)
    hw = n_pos // x.shape[0] if x.shape[0] else 0
    if num_chunks:
        with device_guard(x):
            _bn_partial_stats_kernel[(num_chunks, num_cblocks)](
                x, mean_part, m2_part, pivot,
                num_channels, hw, n_pos,
                *xv.strides(flat), chunk,
                BLOCK_C=cfg.block_c, BLOCK_M=cfg.red_block_m, FLAT=int(flat),
                ACC=tl_dtype(x.dtype), BLOCK_HW=block_hw, ALIGN=align, num_warps=cfg.num_warps,
            )  # fmt: skip
    return mean_part, m2_part, pivot, chunk, num_chunks, cfg
