"""Backward of bounded BN (training and eval), with the receding-penalty gradient fused in.

Per channel ``c`` over the ``n = N*H*W`` positions, ``a = sigmoid(w_c)``,
``invstd = rsqrt(var_c + eps)``, ``xhat = (x - mean_c) * invstd`` and ``g_c`` the upstream gradient
of the penalty output ``p_c = s * (1 - log s)``, ``s = sigmoid(w_c + shift)``::

    sum_dy     = sum(dy)                     sum_dyxhat = invstd * sum(dy * (x - mean))
    db         = sum_dy
    dw         = a * (1 - a) * sum_dyxhat + g * (-log s) * s * (1 - s)
    dx (train) = a * invstd * (dy - sum_dy / n - xhat * sum_dyxhat / n)
    dx (eval)  = a * invstd * dy             (mean, var: running statistics, constants)

Three kernels:

1. ``_bn_bwd_partial_kernel``, grid ``(num_chunks, cdiv(C, BLOCK_C))``: per chunk, fp32 (fp64)
   partials ``sum(dy)`` and ``sum(dy * (x - mean))`` into ``[K, C]`` buffers, summed lane-wise over
   the chunk's tiles and reduced once at the end. No atomics. Flat tiles in chunks of positions,
   or (NCHW) image or split tiles in chunks of an image group's row blocks
   (``_plan.reduction_tiles``).
2. ``_bn_bwd_combine_kernel``, grid ``(cdiv(C, BLOCK_C),)``: sums the partials in chunk order
   (deterministic), writes ``sum_dy``/``sum_dyxhat`` for the dx kernel and ``dw`` (including the
   penalty term, fused here rather than through a second autograd graph) and ``db``.
3. ``_bn_bwd_dx_kernel``, grid ``(position tiles, cdiv(C, BLOCK_C))``: the elementwise ``dx``
   (flat, image or split tiles: ``_plan.position_tiles``).

Absent outputs and inputs are ``None`` pointers (compile-time constants): no ``dw``/``db``
pointer, no such output; no penalty gradient, no penalty term; no sums in the dx kernel, the eval
formula. In eval mode without ``dw``/``db`` only the dx kernel runs; with no positions only the
combine runs (``db = 0``, ``dw = g * dR/dw``). All ``[N, C, HW]`` tensors of a launch share
``x``'s strides (``_layout``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _plan
from ._launch import RUNTIME_SIZES, device_guard
from ._layout import acc_dtype, empty_as, in_layout_of
from ._math import (
    aligned,
    channel_sum,
    channel_tile_offsets,
    chunk_image_lanes,
    position_offsets,
    sigmoid_parts,
    split_offsets,
    split_rows,
    tile_positions,
)
from ._scratch import SUMS, SUMS_ROWS, take

__all__ = ["backward_chunked", "backward_sums", "backward_dx", "run_backward_chunked"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_partial_kernel(
    dy_ptr,  # [N, C, HW] output gradient, strides (s_n, s_c, s_hw)
    x_ptr,  # [N, C, HW] input, same strides
    mean_ptr,  # [C] mean the forward used (batch or running)
    sum_dy_part_ptr,  # [K, C] out: chunk sums of dy (ACC)
    sum_dyxmu_part_ptr,  # [K, C] out: chunk sums of dy * (x - mean) (ACC)
    C,
    HW,
    n_pos,  # N * HW
    s_n,
    s_c,
    s_hw,
    CHUNK,  # positions per chunk (flat tiles), or images per chunk (image/split tiles)
    SEG,  # row blocks per chunk segment (image/split tiles)
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_hw
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # > 0: image tiles (unit H*W stride)
    ALIGN: tl.constexpr,  # divides HW, s_n, s_c (image tiles); SPLIT: the vector width
    SPLIT: tl.constexpr,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c_off = offs_c.to(tl.int64) * aligned(s_c, ALIGN)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)

    if BLOCK_HW == 0:
        acc_dy = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        acc_dyxmu = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        start = pid_k * CHUNK
        end = tl.minimum(start + CHUNK, n_pos)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = mask_c[:, None] & (offs_m < end)[None, :]
            off = c_off[:, None] + position_offsets(offs_m, HW, s_n, s_hw, FLAT)[None, :]
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            acc_dy += dy  # masked lanes load dy = 0 and add nothing
            acc_dyxmu += dy * (x - mean[:, None])
        sum_dy = tl.sum(acc_dy, axis=1)
        sum_dyxmu = tl.sum(acc_dyxmu, axis=1)
    elif SPLIT:
        # Split tiles (odd H*W) over the chunk's images and row blocks: per plane an aligned
        # body [BLOCK_C, images, BLOCK_HW] (vector loads) and head/tail edges [BLOCK_C, images,
        # 2 ALIGN] (scalar, in row block 0 only), summed lane-wise like the other tiles.
        IMGS: tl.constexpr = BLOCK_M // BLOCK_HW
        _, r0, r1, _, n_start, n_end, _, _ = chunk_image_lanes(pid_k, HW, n_pos, CHUNK, SEG, BLOCK_M, BLOCK_HW,
                                                               ALIGN)  # fmt: skip
        e = tl.arange(0, 2 * ALIGN)
        mean3 = mean[:, None, None]
        acc_dy_b = tl.zeros([BLOCK_C, IMGS, BLOCK_HW], dtype=ACC)
        acc_dyxmu_b = tl.zeros([BLOCK_C, IMGS, BLOCK_HW], dtype=ACC)
        acc_dy_e = tl.zeros([BLOCK_C, IMGS, 2 * ALIGN], dtype=ACC)
        acc_dyxmu_e = tl.zeros([BLOCK_C, IMGS, 2 * ALIGN], dtype=ACC)
        for n0 in range(n_start, n_end, IMGS):
            n_idx = n0 + tl.arange(0, IMGS)
            mask_n = n_idx < n_end
            for hb in range(r0, r1):
                q = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
                edge_hw = HW - HW * tl.minimum(hb, 1)
                body, mb, edge, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_n, s_c,
                                                   ALIGN)  # fmt: skip
                dyb = tl.load(dy_ptr + body, mask=mb, other=0.0).to(ACC)
                xb = tl.load(x_ptr + body, mask=mb, other=0.0).to(ACC)
                acc_dy_b += dyb
                acc_dyxmu_b += dyb * (xb - mean3)
                dye = tl.load(dy_ptr + edge, mask=me, other=0.0).to(ACC)
                xe = tl.load(x_ptr + edge, mask=me, other=0.0).to(ACC)
                acc_dy_e += dye
                acc_dyxmu_e += dye * (xe - mean3)
        sum_dy = channel_sum(acc_dy_b) + channel_sum(acc_dy_e)
        sum_dyxmu = channel_sum(acc_dyxmu_b) + channel_sum(acc_dyxmu_e)
    else:
        # Image tiles over the chunk's images and row blocks (as the statistics partial kernel):
        # images [n0, n0 + BLOCK_M // BLOCK_HW) x row block hb; rows start on ALIGN boundaries.
        hw, r0, r1, _, n_start, n_end, j_n, j_hw = chunk_image_lanes(pid_k, HW, n_pos, CHUNK, SEG, BLOCK_M,
                                                                     BLOCK_HW, ALIGN)  # fmt: skip
        s_n_al = aligned(s_n, ALIGN)
        acc_dy = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        acc_dyxmu = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        for n0 in range(n_start, n_end, BLOCK_M // BLOCK_HW):
            n_idx = n0 + j_n
            n_off = n_idx.to(tl.int64) * s_n_al
            for hb in range(r0, r1):
                hw_idx = hb * BLOCK_HW + j_hw
                mask = mask_c[:, None] & ((n_idx < n_end) & (hw_idx < hw))[None, :]
                off = c_off[:, None] + (n_off + hw_idx)[None, :]
                dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
                x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
                acc_dy += dy
                acc_dyxmu += dy * (x - mean[:, None])
        sum_dy = tl.sum(acc_dy, axis=1)
        sum_dyxmu = tl.sum(acc_dyxmu, axis=1)

    out = pid_k.to(tl.int64) * C + offs_c
    tl.store(sum_dy_part_ptr + out, sum_dy, mask=mask_c)
    tl.store(sum_dyxmu_part_ptr + out, sum_dyxmu, mask=mask_c)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_combine_kernel(
    sum_dy_part_ptr,  # [K, C] chunk sums of dy (ACC)
    sum_dyxmu_part_ptr,  # [K, C] chunk sums of dy * (x - mean) (ACC)
    var_ptr,  # [C] variance the forward used
    w_ptr,  # [C] scale logits (read for dw)
    g_ptr,  # [C] upstream gradient of the penalty, stride s_g; None: no penalty term
    sum_dy_ptr,  # [C] out: sum(dy) (ACC), for the dx kernel
    sum_dyxhat_ptr,  # [C] out: sum(dy * xhat) (ACC), for the dx kernel
    dw_ptr,  # [C] out: weight gradient; None: not wanted
    db_ptr,  # [C] out: bias gradient; None: not wanted
    C,
    K,  # number of chunks
    s_g,  # stride of g (0 for the expanded gradient of penalty.sum(): read in place)
    eps,
    shift,  # penalty shift: s = sigmoid(w + shift)
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    acc_dy = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    acc_dyxmu = tl.zeros([BLOCK_K, BLOCK_C], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & mask_c[None, :]
        ptr_off = offs_k.to(tl.int64)[:, None] * C + offs_c[None, :]
        acc_dy += tl.load(sum_dy_part_ptr + ptr_off, mask=mask, other=0.0)
        acc_dyxmu += tl.load(sum_dyxmu_part_ptr + ptr_off, mask=mask, other=0.0)
    sum_dy = tl.sum(acc_dy, axis=0)
    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    sum_dyxhat = tl.sum(acc_dyxmu, axis=0) * tl.rsqrt(var + eps)
    tl.store(sum_dy_ptr + offs_c, sum_dy, mask=mask_c)
    tl.store(sum_dyxhat_ptr + offs_c, sum_dyxhat, mask=mask_c)

    if dw_ptr is not None:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, one_minus_a, _ = sigmoid_parts(w)
        dw = a * one_minus_a * sum_dyxhat
        if g_ptr is not None:
            g = tl.load(g_ptr + offs_c.to(tl.int64) * s_g, mask=mask_c, other=0.0).to(ACC)
            s, one_minus_s, log_s = sigmoid_parts(w + shift)
            dw += g * (-log_s * s * one_minus_s)
        tl.store(dw_ptr + offs_c, dw.to(dw_ptr.dtype.element_ty), mask=mask_c)
    if db_ptr is not None:
        tl.store(db_ptr + offs_c, sum_dy.to(db_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_dx_kernel(
    dy_ptr,  # [N, C, HW] output gradient, strides (s_n, s_c, s_hw)
    x_ptr,  # [N, C, HW] input, same strides (read in training)
    dx_ptr,  # [N, C, HW] out: input gradient, same strides
    mean_ptr,  # [C] mean the forward used (read in training)
    var_ptr,  # [C] variance the forward used
    w_ptr,  # [C] scale logits; None: scale 1
    sum_dy_ptr,  # [C] sum(dy); None: eval mode (dx = A dy)
    sum_dyxhat_ptr,  # [C] sum(dy * xhat) (with sum_dy_ptr)
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
    MEANS: tl.constexpr,  # 1: the sum_* buffers already hold means (sums over another count)
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    invstd = tl.rsqrt(var + eps)
    scale = invstd
    if w_ptr is not None:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, _, _ = sigmoid_parts(w)
        scale = scale * a
    if sum_dy_ptr is not None:
        # n_pos promotes to ACC here (no .to(): Triton may specialise n_pos == 1 to a constexpr).
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        mean_dy = tl.load(sum_dy_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        mean_dyxhat = tl.load(sum_dyxhat_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        if not MEANS:
            mean_dy = mean_dy / n_pos
            mean_dyxhat = mean_dyxhat / n_pos
    else:
        mean = tl.zeros_like(scale)  # unused in eval mode
        mean_dy = mean
        mean_dyxhat = mean
    if SPLIT:
        n_idx, q, e, mask_n, edge_hw = split_rows(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        body, mb, edge, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_n, s_c, ALIGN)
        mean3, invstd3, scale3 = mean[:, None, None], invstd[:, None, None], scale[:, None, None]
        mdy3, mdx3 = mean_dy[:, None, None], mean_dyxhat[:, None, None]
        _dx_part(dy_ptr, x_ptr, dx_ptr, body, mb, mean3, invstd3, scale3, mdy3, mdx3, sum_dy_ptr is not None, ACC)
        _dx_part(dy_ptr, x_ptr, dx_ptr, edge, me, mean3, invstd3, scale3, mdy3, mdx3, sum_dy_ptr is not None, ACC)
    else:
        pos_a, pos_b, mask_m = tile_positions(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_n, s_c, s_hw, FLAT, BLOCK_HW, ALIGN)
        _dx_part(dy_ptr, x_ptr, dx_ptr, off, mask_c[:, None] & mask_m[None, :], mean[:, None], invstd[:, None],
                 scale[:, None], mean_dy[:, None], mean_dyxhat[:, None], sum_dy_ptr is not None, ACC)  # fmt: skip


@triton.jit
def _dx_part(dy_ptr, x_ptr, dx_ptr, off, mask, mean, invstd, scale, mean_dy, mean_dyxhat,
             TRAINING: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """``dx`` on a 2-D tile or one part (body or edges) of a split tile; the per-channel values
    come broadcastable to the tile."""
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
    if TRAINING:
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean) * invstd
        dx = scale * (dy - mean_dy - xhat * mean_dyxhat)
    else:
        dx = scale * dy
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _param_grad(num_channels: int, needed: bool, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised ``[C]`` gradient, or an empty ``[0]`` one when not ``needed``."""
    return torch.empty(num_channels if needed else 0, dtype=dtype, device=device)


def _launch_sums(plan, dy, x, mean, var, weight, g, eps, shift, sums, dw, db, parts) -> None:
    """The sums reduction ``plan`` (an ``_plan.Reduction``: partials + combine):
    ``sums = (sum(dy), sum(dy * xhat))`` (the rows of a ``[2, C]`` buffer, as a pair of views:
    each view costs the host an op), and ``dw``/``db`` when given (``None``: not wanted), through
    ``parts``, the ``[Reduction.rows, C]`` partial buffers (``_scratch``). The caller holds
    ``device_guard(x)``."""
    dy_part, dyxmu_part = parts
    if plan.num_chunks:
        p = plan.partials
        _bn_bwd_partial_kernel.run(dy, x, mean, dy_part, dyxmu_part, *p.sizes, *p.consts, grid=p.grid, warmup=False,
                                   num_warps=p.num_warps)  # fmt: skip
    m = plan.combine
    _bn_bwd_combine_kernel.run(dy_part, dyxmu_part, var, weight, g, *sums, dw, db, *m.sizes,
                               0 if g is None else g.stride(0), float(eps), float(shift), *m.consts, grid=m.grid,
                               warmup=False, num_warps=m.num_warps)  # fmt: skip


def _launch_dx(launch, dy, x, dx, mean, var, weight, sums, eps, means: bool) -> None:
    """The elementwise ``dx`` launch; ``sums``: the pair of ``[C]`` rows (``_launch_sums``) or
    ``None``. The caller holds ``device_guard(x)``."""
    _bn_bwd_dx_kernel.run(
        dy, x if sums is not None else None, dx, mean if sums is not None else None, var, weight,
        *((None, None) if sums is None else sums), *launch.sizes, float(eps),
        *launch.consts, int(means), grid=launch.grid, warmup=False, num_warps=launch.num_warps,
    )  # fmt: skip


def backward_chunked(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                     penalty_grad: Tensor | None, eps: float, shift: float, training: bool,
                     output_mask=(True, True, True), *, out=None, config=None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dw, db)`` of bounded BN given the output gradient ``dy``: partials + combine + dx.

    ``mean``/``var`` are what the forward normalised with: batch mean and biased variance
    (``training``) or the running statistics (eval, treated as constants). ``penalty_grad`` is the
    upstream gradient ``g`` of the per-channel penalty (``None``: the penalty is not in the loss;
    read with its stride, 0 when expanded). ``output_mask`` says which of ``dx, dw, db`` to
    compute; the others come back as empty ``[0]`` tensors. ``dx`` has ``x``'s dtype and layout;
    ``dw``/``db`` are float32 (float64 for a float64 ``x``) ``[C]``. ``dy`` may have any layout
    (copied into ``x``'s when it differs). ``out`` (tests) supplies pre-allocated outputs.
    Arguments are those the op ``rnip_ext::bounded_bn_backward`` checked.
    """
    x, plan = _plan.prepared(x, config)
    return run_backward_chunked(x, plan, dy, mean, var, weight, penalty_grad, eps, shift, training, output_mask,
                                out)  # fmt: skip


def run_backward_chunked(x, plan, dy, mean, var, weight, penalty_grad, eps, shift, training, output_mask,
                         out=None):  # fmt: skip
    """:func:`backward_chunked` on a prepared ``x`` and its plan (``_plan.prepared``)."""
    need_dx, need_dw, need_db = output_mask
    if dy.stride() != plan.strides:  # in_layout_of's first test, against the plan (host time)
        dy = in_layout_of(dy, x)
    c, n_pos, acc, device = plan.shape[1], plan.n_pos, plan.acc, plan.device
    if out is None:
        dx = torch.empty_strided(plan.shape, plan.strides, dtype=plan.dtype, device=device) if need_dx else x.new_empty(0)
        dw = torch.empty(c if need_dw else 0, dtype=acc, device=device)  # _param_grad, inlined
        db = torch.empty(c if need_db else 0, dtype=acc, device=device)
    else:
        dx = (_plan.check_out(out[0], x) if out[0] is not None else empty_as(x)) if need_dx else x.new_empty(0)
        dw = out[1] if out[1] is not None else _param_grad(c, need_dw, acc, device)
        db = out[2] if out[2] is not None else _param_grad(c, need_db, acc, device)
    need_sums = need_dw or need_db or (need_dx and training)
    if c == 0 or not (need_sums or (need_dx and n_pos)):
        return dx, dw, db
    sums = None
    with device_guard(x):
        if need_sums:
            # Per-call scratch (cached per thread and stream, _scratch): the partials and the
            # [2, C] sums the dx kernel reads, as its two rows.
            parts, sums = take(device, acc, SUMS_ROWS, plan.sums.rows, c)
            _launch_sums(plan.sums, dy, x, mean, var, weight, penalty_grad if need_dw else None, eps, shift, sums,
                         dw if need_dw else None, db if need_db else None, parts)  # fmt: skip
        if need_dx and n_pos:
            _launch_dx(plan.elementwise, dy, x, dx, mean, var, weight, sums if training else None, eps, False)
    return dx, dw, db


def backward_sums(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                  penalty_grad: Tensor | None, eps: float, shift: float, need_dw: bool = True,
                  need_db: bool = True, *, config=None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """This process's per-channel sums for a distributed backward, and its ``(dw, db)`` shares.

    Returns ``sums`` ``[2, C]`` in the accumulation dtype (``sum(dy)`` and ``sum(dy * xhat)``,
    ``xhat`` with the given, e.g. global, ``mean``/``var``: one all-reduce away from the global
    sums), ``dw = a (1 - a) sums[1] + g dR/dw`` and ``db = sums[0]`` of the local positions (empty
    ``[0]`` when not needed). Partials + combine: two launches; no positions give zero sums.
    """
    x, plan = _plan.prepared(x, config)
    dy = in_layout_of(dy, x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    sums = torch.empty((2, c), dtype=acc, device=x.device)
    dw, db = _param_grad(c, need_dw, acc, x.device), _param_grad(c, need_db, acc, x.device)
    if c:
        with device_guard(x):
            _launch_sums(plan.sums, dy, x, mean, var, weight, penalty_grad if need_dw else None,
                         eps, shift, (sums[0], sums[1]), dw if need_dw else None, db if need_db else None,
                         take(x.device, acc, SUMS, plan.sums.rows, c))  # fmt: skip
    return sums, dw, db


def backward_dx(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, means: Tensor,
                eps: float, *, config=None) -> Tensor:  # fmt: skip
    """``dx = a invstd (dy - means[0] - xhat means[1])`` with given (e.g. global) mean gradients.

    ``means`` is ``[2, C]``: ``mean(dy)`` and ``mean(dy * xhat)`` over whatever batch the
    statistics span (all ranks, for ``SyncBoundedBatchNorm2d``). One launch.
    """
    x, plan = _plan.prepared(x, config)
    dy = in_layout_of(dy, x)
    dx = empty_as(x)
    if plan.elementwise is not None:
        with device_guard(x):
            _launch_dx(plan.elementwise, dy, x, dx, mean, var, weight, (means[0], means[1]), eps, True)
    return dx
