"""Batch statistics of bounded BN (training forward), plus the receding penalty per channel.

Per channel ``c`` over the ``n = N*H*W`` positions::

    mean_c = sum(x) / n            var_c = sum((x - mean_c)^2) / n          (biased)
    p_c    = s * (1 - log s),      s = sigmoid(w_c + shift)                 (with a penalty output)

Two kernels:

1. ``_bn_partial_stats_kernel``, grid ``(num_chunks, cdiv(C, BLOCK_C))``: each program reduces one
   chunk (``_config.plan_chunks``: ``CHUNK`` flat positions; ``plan_image_chunks``: ``CHUNK``
   images x a segment of ``SEG`` row blocks) for ``BLOCK_C`` channels to ``(mean_k, M2_k)`` and
   its position count ``n_k`` (chunk sizes and counts are runtime arguments, like every size that
   changes with the batch). Values are first shifted by a per-channel pivot ``x[0, c, 0]`` (exact
   for values within a factor of two of it), so that a large ``|mean|`` costs no precision in the
   means the merges subtract; chunk 0's programs write the pivot for the combine. Inside the
   chunk every lane of the ``[BLOCK_C, BLOCK_M]`` tile keeps its own Welford ``(n, mean, M2)`` (no
   cross-lane reduction in the loop); the lanes are merged once at the end with Chan's formula::

       n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,
       M2 = M2_a + M2_b + d^2 * na * nb / n

2. ``_bn_combine_stats_kernel``, grid ``(cdiv(C, BLOCK_C),)``: merges the chunk partials in chunk
   order (deterministic), ``BLOCK_K`` chunks at a time: their pooled mean
   ``sum(n_k mean_k) / sum(n_k)`` and ``M2 = sum(M2_k) + sum(n_k (mean_k - mean)^2)``, merged
   into the running triple as above; writes ``mean = pivot + mean`` and ``var = M2 / n`` (both
   ``0`` when ``n == 0``), the penalty (``pen_ptr`` given) and the running statistics
   (``rmean_ptr`` given; ``_math.update_running``). The partials are read once, here: chunks
   hold >= ``_config.MIN_CHUNK_POSITIONS`` positions, so they stay within ~3% of the input.

Never ``E[x^2] - E[x]^2``: each merge subtracts means, never sums of squares. All arithmetic in
``ACC`` (fp32, or fp64 for fp64 inputs); inputs of any float dtype are converted on load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _plan
from ._launch import RUNTIME_SIZES, device_guard, running_mode
from ._layout import acc_dtype
from ._math import aligned, chunk_image_lanes, count_batch, position_offsets, sigmoid_parts, update_running
from ._scratch import STATS, fresh, take

__all__ = ["batch_stats", "launch_stats", "stats_launches"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_partial_stats_kernel(
    x_ptr,  # [N, C, HW] input, strides (s_n, s_c, s_hw)
    mean_part_ptr,  # [K, C] out: chunk means of x - pivot (ACC), row k = chunk k
    m2_part_ptr,  # [K, C] out: chunk sums of squared deviations (ACC)
    count_part_ptr,  # [K] out: positions of chunk k (ACC; written by the first channel block)
    pivot_ptr,  # [C] out (chunk 0's programs): the shift x[0, c, 0] (ACC)
    C,
    HW,
    n_pos,  # N * HW
    s_n,
    s_c,
    s_hw,
    CHUNK,  # positions per chunk (flat tiles), or images per chunk (image tiles)
    SEG,  # row blocks per chunk segment (image tiles)
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_hw
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # > 0: image tiles (unit H*W stride)
    ALIGN: tl.constexpr,  # divides HW, s_n, s_c (image tiles)
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c_off = offs_c.to(tl.int64) * aligned(s_c, ALIGN)
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
            m_off = position_offsets(offs_m, HW, s_n, s_hw, FLAT)
            x = tl.load(x_ptr + c_off[:, None] + m_off[None, :], mask=mask, other=0.0).to(ACC)
            x = x - pivot[:, None]
            inv = 1.0 / ((m0 - start) // BLOCK_M + 1).to(ACC)
            delta = tl.where(mask, x - lane_mean, 0.0)
            lane_mean += delta * inv
            lane_m2 += delta * tl.where(mask, x - lane_mean, 0.0)
            lane_n += mask.to(ACC)
    else:
        # Image tiles: images [n0, n0 + BLOCK_M // BLOCK_HW) x row block hb of BLOCK_HW
        # positions, over the chunk's images and row blocks [r0, r1). Lanes past H*W in the last
        # row block ("short" lanes) skip it, so before step (g, hb) (g-th image group of the
        # chunk) a lane has seen g * (r1 - r0) + hb - r0 values, a short lane
        # g * (r1 - r0 - last) + hb - r0: two scalar divisions per step, still none per element.
        # Lanes of missing images in the chunk's last group skip all of its steps and are never
        # updated again.
        hw, r0, r1, last, n_start, n_end, j_n, j_hw = chunk_image_lanes(pid_k, HW, n_pos, CHUNK, SEG, BLOCK_M,
                                                                        BLOCK_HW, ALIGN)  # fmt: skip
        full = (tl.cdiv(hw, BLOCK_HW) - 1) * BLOCK_HW + j_hw < hw
        s_n_al = aligned(s_n, ALIGN)
        for n0 in range(n_start, n_end, BLOCK_M // BLOCK_HW):
            n_idx = n0 + j_n
            a_off = n_idx.to(tl.int64) * s_n_al
            group = (n0 - n_start) // (BLOCK_M // BLOCK_HW)
            for hb in range(r0, r1):
                hw_idx = hb * BLOCK_HW + j_hw
                mask = mask_c[:, None] & ((n_idx < n_end) & (hw_idx < hw))[None, :]
                x = tl.load(x_ptr + c_off[:, None] + (a_off + hw_idx)[None, :], mask=mask,
                            other=0.0).to(ACC)  # fmt: skip
                x = x - pivot[:, None]
                inv_full = 1.0 / (group * (r1 - r0) + hb - r0 + 1).to(ACC)
                inv_short = 1.0 / (group * (r1 - r0 - last) + hb - r0 + 1).to(ACC)
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
    if pid_c == 0:  # channel 0 exists (C >= 1) and saw every position of the chunk
        tl.store(count_part_ptr + pid_k, tl.sum(tl.where(offs_c == 0, count, 0.0), axis=0))


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_combine_stats_kernel(
    mean_part_ptr,  # [K, C] chunk means of x - pivot (ACC)
    m2_part_ptr,  # [K, C] chunk sums of squared deviations (ACC)
    count_part_ptr,  # [K] chunk position counts (ACC)
    pivot_ptr,  # [C] the shift of the partial means (zeros when K == 0)
    w_ptr,  # [C] scale logits (read for the penalty)
    mean_ptr,  # [C] out: batch mean (ACC)
    var_ptr,  # [C] out: biased batch variance (ACC)
    pen_ptr,  # [C] out: receding penalty s * (1 - log s); None: no penalty
    rmean_ptr,  # [C] running mean, updated in place; None: no running statistics
    rvar_ptr,  # [C] running variance, updated in place (with rmean_ptr)
    nbt_ptr,  # [] num_batches_tracked (RUNNING 1: incremented, 2: read)
    C,
    K,  # number of chunks
    shift,  # penalty shift: s = sigmoid(w + shift)
    momentum,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    RUNNING: tl.constexpr,  # _launch.RUNNING_*: 0 momentum, 1 momentum + count, 2 cumulative
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if rmean_ptr is not None:
        count_batch(nbt_ptr, pid_c, RUNNING)

    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_k[:, None] & mask_c[None, :]
        n_k = tl.load(count_part_ptr + offs_k, mask=mask_k, other=0.0)
        ptr_off = offs_k.to(tl.int64)[:, None] * C + offs_c[None, :]
        mean_k = tl.load(mean_part_ptr + ptr_off, mask=mask, other=0.0)
        m2_k = tl.load(m2_part_ptr + ptr_off, mask=mask, other=0.0)
        # Pool these BLOCK_K chunks (a chunk of no positions contributes nothing) ...
        nb = tl.sum(n_k, axis=0)
        mean_b = tl.sum(n_k[:, None] * mean_k, axis=0) / tl.maximum(nb, 1.0)
        dev = mean_k - mean_b[None, :]
        m2_b = tl.sum(m2_k, axis=0) + tl.sum(n_k[:, None] * dev * dev, axis=0)
        # ... and merge the pool into the running triple (Chan).
        total = count + nb
        delta = mean_b - mean
        frac = nb / tl.maximum(total, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * (count * frac)
        count = total

    var = tl.where(count > 0.0, m2 / tl.maximum(count, 1.0), 0.0)
    mean = tl.load(pivot_ptr + offs_c, mask=mask_c, other=0.0) + mean
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    if pen_ptr is not None:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        s, _, log_s = sigmoid_parts(w + shift)
        tl.store(pen_ptr + offs_c, s * (1.0 - log_s), mask=mask_c)
    if rmean_ptr is not None:
        update_running(rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c, mean, var, count, momentum,
                       RUNNING == 2, ACC)  # fmt: skip


def launch_stats(plan, x: Tensor, weight, shift: float, mean: Tensor, var: Tensor, penalty, running, momentum,
                 num_batches_tracked) -> None:  # fmt: skip
    """The statistics reduction ``plan`` (an ``_plan.Reduction``: partials + combine) on ``x``
    (kernel-ready, ``C > 0``): writes ``mean``, ``var`` (``[C]``, accumulation dtype), ``penalty``
    (given: ``[C]``; ``None``: none) and the running statistics."""
    c = x.shape[1]
    with device_guard(x):
        stats_launches(plan, x, c, acc_dtype(x.dtype), x.device, x.numel() // c, weight, shift, mean, var, penalty,
                       running, momentum, num_batches_tracked)  # fmt: skip


def stats_launches(plan, x: Tensor, c: int, acc, device, n_pos: int, weight, shift: float, mean: Tensor, var: Tensor,
                   penalty, running, momentum, num_batches_tracked) -> None:  # fmt: skip
    """:func:`launch_stats` given ``x``'s channels, accumulation dtype, device and positions, under
    the caller's ``device_guard(x)`` (the training forward holds one for all its launches)."""
    rm, rv, nbt, mode = running_mode(running, momentum, num_batches_tracked, n_pos)
    if plan.num_chunks:
        # [Reduction.rows, C] partials, counts [rows]; the pivot is written by the partial
        # kernel's first chunk. Per-call scratch: cached per thread and stream (_scratch).
        mean_part, m2_part, counts, pivot = take(device, acc, STATS, plan.rows, c)
        p = plan.partials
        _bn_partial_stats_kernel.run(x, mean_part, m2_part, counts, pivot, *p.sizes, *p.consts, grid=p.grid,
                                     warmup=False, num_warps=p.num_warps)  # fmt: skip
    else:  # no positions (an empty batch): the combine reads a zero pivot and no partials
        mean_part, m2_part, counts, pivot = fresh(device, acc, STATS, plan.rows, c)
        pivot.zero_()
    m = plan.combine
    _bn_combine_stats_kernel.run(mean_part, m2_part, counts, pivot, weight, mean, var, penalty, rm, rv, nbt, *m.sizes,
                                 float(shift), 0.0 if momentum is None else float(momentum), *m.consts, mode,
                                 grid=m.grid, warmup=False, num_warps=m.num_warps)  # fmt: skip


def batch_stats(x: Tensor, weight: Tensor | None = None, shift: float = 0.0, with_penalty: bool = False, *,
                config=None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Per-channel batch ``mean``, biased ``var`` and receding ``penalty`` of ``x`` ``[N, C, *]``
    (the local statistics of ``SyncBoundedBatchNorm2d``; two launches).

    ``mean``/``var`` are float32 (float64 for a float64 ``x``), shape ``[C]``; with no positions
    both are 0. ``penalty`` is ``s * (1 - log s)`` per channel, ``s = sigmoid(weight + shift)``,
    when ``with_penalty`` and ``weight`` is given, else an empty ``[0]`` tensor. Arguments are
    those the op ``rnip_ext::bounded_bn_stats`` checked.
    """
    x, plan = _plan.prepared(x, config)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    penalize = bool(with_penalty) and weight is not None
    mean = torch.empty(c, dtype=acc, device=x.device)
    var = torch.empty(c, dtype=acc, device=x.device)
    penalty = torch.empty(c if penalize else 0, dtype=acc, device=x.device)
    if c:
        launch_stats(plan.stats, x, weight, shift, mean, var, penalty if penalize else None,
                     None, 0.1, None)  # fmt: skip
    return mean, var, penalty
