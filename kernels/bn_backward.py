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

1. ``_bn_bwd_partial_kernel``, grid ``(num_chunks, cdiv(C, BLOCK_C))``: per chunk of positions,
   fp32 (fp64) partials ``sum(dy)`` and ``sum(dy * (x - mean))`` into ``[K, C]`` buffers, summed
   lane-wise over the chunk's tiles and reduced once at the end. No atomics. Flat or, for
   NCHW, image tiles over chunks of whole images (``_launch.reduction_tiles``).
2. ``_bn_bwd_combine_kernel``, grid ``(cdiv(C, COMB_BLOCK_C),)``: sums the partials in chunk order
   (deterministic), writes ``sum_dy``/``sum_dyxhat`` for the dx kernel and ``dw`` (including the
   penalty term, fused here rather than through a second autograd graph) and ``db``.
3. ``_bn_bwd_dx_kernel``, grid ``(position tiles, cdiv(C, BLOCK_C))``: the elementwise ``dx``
   (flat or, for NCHW, image or split tiles: ``_launch.position_tiles``).

In eval mode without ``dw``/``db`` only the dx kernel runs; with no positions (``n == 0``) only
the combine runs (``db = 0``, ``dw = g * dR/dw``).
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
    position_tiles,
    reduction_tiles,
    tl_dtype,
    vector,
    view3,
)
from ._layout import acc_dtype, alloc_like
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

__all__ = ["bn_backward", "bn_backward_sums", "bn_backward_dx"]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_partial_kernel(
    dy_ptr,  # [N, C, HW] output gradient, strides (s_dn, s_dc, s_dhw)
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw)
    mean_ptr,  # [C] mean the forward used (batch or running)
    sum_dy_part_ptr,  # [K, C] out: chunk sums of dy (ACC)
    sum_dyxmu_part_ptr,  # [K, C] out: chunk sums of dy * (x - mean) (ACC)
    C,
    HW,
    n_pos,  # N * HW
    s_dn,
    s_dc,
    s_dhw,
    s_xn,
    s_xc,
    s_xhw,
    CHUNK,  # positions per chunk, a multiple of BLOCK_M (runtime: no recompiles per batch size)
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by s_dhw / s_xhw
    ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles, chunks of whole images (unit H*W stride)
    ALIGN: tl.constexpr = 1,  # divides HW, s_dn, s_dc, s_xn, s_xc (image tiles); SPLIT: vectors
    SPLIT: tl.constexpr = 0,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dc_off = offs_c.to(tl.int64) * aligned(s_dc, ALIGN)
    xc_off = offs_c.to(tl.int64) * aligned(s_xc, ALIGN)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)

    if BLOCK_HW == 0:
        acc_dy = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        acc_dyxmu = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        start = pid_k * CHUNK
        end = tl.minimum(start + CHUNK, n_pos)
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = mask_c[:, None] & (offs_m < end)[None, :]
            d_off = dc_off[:, None] + position_offsets(offs_m, HW, s_dn, s_dhw, FLAT)[None, :]
            x_off = xc_off[:, None] + position_offsets(offs_m, HW, s_xn, s_xhw, FLAT)[None, :]
            dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
            acc_dy += dy  # masked lanes load dy = 0 and add nothing
            acc_dyxmu += dy * (x - mean[:, None])
        sum_dy = tl.sum(acc_dy, axis=1)
        sum_dyxmu = tl.sum(acc_dyxmu, axis=1)
    elif SPLIT:
        # Split tiles (odd H*W) over the chunk's whole images: per plane an aligned body
        # [BLOCK_C, images, BLOCK_HW] (vector loads) and head/tail edges [BLOCK_C, images,
        # 2 ALIGN] (scalar, first row block only), summed lane-wise like the other tiles.
        IMGS: tl.constexpr = BLOCK_M // BLOCK_HW
        row_blocks = tl.maximum(tl.cdiv(aligned(HW, ALIGN), BLOCK_HW), 1)
        per_chunk = CHUNK // HW
        n_start = pid_k * per_chunk
        n_end = tl.minimum(n_start + per_chunk, n_pos // HW)
        e = tl.arange(0, 2 * ALIGN)
        mean3 = mean[:, None, None]
        acc_dy_b = tl.zeros([BLOCK_C, IMGS, BLOCK_HW], dtype=ACC)
        acc_dyxmu_b = tl.zeros([BLOCK_C, IMGS, BLOCK_HW], dtype=ACC)
        acc_dy_e = tl.zeros([BLOCK_C, IMGS, 2 * ALIGN], dtype=ACC)
        acc_dyxmu_e = tl.zeros([BLOCK_C, IMGS, 2 * ALIGN], dtype=ACC)
        for n0 in range(n_start, n_end, IMGS):
            n_idx = n0 + tl.arange(0, IMGS)
            mask_n = n_idx < n_end
            for hb in range(0, row_blocks):
                q = hb * BLOCK_HW + tl.arange(0, BLOCK_HW)
                edge_hw = HW - HW * tl.minimum(hb, 1)
                db_off, mb, de_off, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e,
                                                       edge_hw, HW, s_dn, s_dc, ALIGN)  # fmt: skip
                xb_off, _, xe_off, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e,
                                                     edge_hw, HW, s_xn, s_xc, ALIGN)  # fmt: skip
                dyb = tl.load(dy_ptr + db_off, mask=mb, other=0.0).to(ACC)
                xb = tl.load(x_ptr + xb_off, mask=mb, other=0.0).to(ACC)
                acc_dy_b += dyb
                acc_dyxmu_b += dyb * (xb - mean3)
                dye = tl.load(dy_ptr + de_off, mask=me, other=0.0).to(ACC)
                xe = tl.load(x_ptr + xe_off, mask=me, other=0.0).to(ACC)
                acc_dy_e += dye
                acc_dyxmu_e += dye * (xe - mean3)
        sum_dy = channel_sum(acc_dy_b) + channel_sum(acc_dy_e)
        sum_dyxmu = channel_sum(acc_dyxmu_b) + channel_sum(acc_dyxmu_e)
    else:
        # Image tiles over the chunk's whole images (as the statistics partial kernel): images
        # [n0, n0 + BLOCK_M // BLOCK_HW) x row block hb; rows start on ALIGN boundaries.
        hw, row_blocks, n_start, n_end, j_n, j_hw = chunk_image_lanes(pid_k, HW, n_pos, CHUNK, BLOCK_M, BLOCK_HW,
                                                                            ALIGN)  # fmt: skip
        s_dn_al = aligned(s_dn, ALIGN)
        s_xn_al = aligned(s_xn, ALIGN)
        acc_dy = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        acc_dyxmu = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC)
        for n0 in range(n_start, n_end, BLOCK_M // BLOCK_HW):
            n_idx = n0 + j_n
            dn_off = n_idx.to(tl.int64) * s_dn_al
            xn_off = n_idx.to(tl.int64) * s_xn_al
            for hb in range(0, row_blocks):
                hw_idx = hb * BLOCK_HW + j_hw
                mask = mask_c[:, None] & ((n_idx < n_end) & (hw_idx < hw))[None, :]
                dy = tl.load(dy_ptr + dc_off[:, None] + (dn_off + hw_idx)[None, :], mask=mask,
                             other=0.0).to(ACC)  # fmt: skip
                x = tl.load(x_ptr + xc_off[:, None] + (xn_off + hw_idx)[None, :], mask=mask,
                            other=0.0).to(ACC)  # fmt: skip
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
    w_ptr,  # [C] scale logits (read with WRITE_DW)
    g_ptr,  # [C] upstream gradient of the penalty, stride s_g (read with HAS_G)
    sum_dy_ptr,  # [C] out: sum(dy) (ACC), for the dx kernel
    sum_dyxhat_ptr,  # [C] out: sum(dy * xhat) (ACC), for the dx kernel
    dw_ptr,  # [C] out: weight gradient (written with WRITE_DW)
    db_ptr,  # [C] out: bias gradient (written with WRITE_DB)
    C,
    K,  # number of chunks
    s_g,  # stride of g (0 for the expanded gradient of penalty.sum(): read in place)
    eps,
    shift,  # penalty shift: s = sigmoid(w + shift)
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_G: tl.constexpr,  # add the penalty term (needs WRITE_DW)
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
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

    if WRITE_DW:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, one_minus_a, _ = sigmoid_parts(w)
        dw = a * one_minus_a * sum_dyxhat
        if HAS_G:
            g = tl.load(g_ptr + offs_c.to(tl.int64) * s_g, mask=mask_c, other=0.0).to(ACC)
            s, one_minus_s, log_s = sigmoid_parts(w + shift)
            dw += g * (-log_s * s * one_minus_s)
        tl.store(dw_ptr + offs_c, dw.to(dw_ptr.dtype.element_ty), mask=mask_c)
    if WRITE_DB:
        tl.store(db_ptr + offs_c, sum_dy.to(db_ptr.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def _bn_bwd_dx_kernel(
    dy_ptr,  # [N, C, HW] output gradient, strides (s_dn, s_dc, s_dhw)
    x_ptr,  # [N, C, HW] input, strides (s_xn, s_xc, s_xhw) (read with TRAINING)
    dx_ptr,  # [N, C, HW] out: input gradient, strides (s_gn, s_gc, s_ghw)
    mean_ptr,  # [C] mean the forward used (read with TRAINING)
    var_ptr,  # [C] variance the forward used
    w_ptr,  # [C] scale logits (read with HAS_W)
    sum_dy_ptr,  # [C] sum(dy) (read with TRAINING)
    sum_dyxhat_ptr,  # [C] sum(dy * xhat) (read with TRAINING)
    C,
    HW,
    n_pos,  # N * HW
    eps,
    s_dn,
    s_dc,
    s_dhw,
    s_xn,
    s_xc,
    s_xhw,
    s_gn,
    s_gc,
    s_ghw,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    FLAT: tl.constexpr,  # 1: positions evenly spaced by the *_hw strides
    HAS_W: tl.constexpr,
    TRAINING: tl.constexpr,  # 1: batch statistics (full formula), 0: running (dx = A * dy)
    ACC: tl.constexpr,
    MEANS: tl.constexpr = 0,  # 1: the sum_* buffers already hold means (sums over another count)
    BLOCK_HW: tl.constexpr = 0,  # > 0: image tiles (_math.tile_positions), unit H*W stride
    ALIGN: tl.constexpr = 1,  # divides HW, s_*n, s_*c (image tiles); vector width (SPLIT)
    SPLIT: tl.constexpr = 0,  # 1: split tiles (_math.split_offsets), BLOCK_HW the body width
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    invstd = tl.rsqrt(var + eps)
    scale = invstd
    if HAS_W:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, _, _ = sigmoid_parts(w)
        scale = scale * a
    if TRAINING:
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
        db_, mb, de, me = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_dn,
                                        s_dc, ALIGN)  # fmt: skip
        xb, _, xe, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_xn, s_xc,
                                     ALIGN)  # fmt: skip
        gb, _, ge, _ = split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_gn, s_gc,
                                     ALIGN)  # fmt: skip
        mean3, invstd3, scale3 = mean[:, None, None], invstd[:, None, None], scale[:, None, None]
        mdy3, mdx3 = mean_dy[:, None, None], mean_dyxhat[:, None, None]
        _dx_part(dy_ptr, x_ptr, dx_ptr, db_, xb, gb, mb, mean3, invstd3, scale3, mdy3, mdx3,
                 TRAINING, ACC)  # fmt: skip
        _dx_part(dy_ptr, x_ptr, dx_ptr, de, xe, ge, me, mean3, invstd3, scale3, mdy3, mdx3,
                 TRAINING, ACC)  # fmt: skip
    else:
        pos_a, pos_b, mask_m = tile_positions(pid_m, HW, n_pos, BLOCK_M, BLOCK_HW, ALIGN)
        mask = mask_c[:, None] & mask_m[None, :]
        d_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_dn, s_dc, s_dhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        x_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_xn, s_xc, s_xhw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        g_off = channel_tile_offsets(offs_c, pos_a, pos_b, HW, s_gn, s_gc, s_ghw, FLAT, BLOCK_HW, ALIGN)  # fmt: skip
        _dx_part(dy_ptr, x_ptr, dx_ptr, d_off, x_off, g_off, mask, mean[:, None],
                 invstd[:, None], scale[:, None], mean_dy[:, None], mean_dyxhat[:, None],
                 TRAINING, ACC)  # fmt: skip


@triton.jit
def _dx_part(dy_ptr, x_ptr, dx_ptr, d_off, x_off, g_off, mask, mean, invstd, scale, mean_dy,
             mean_dyxhat, TRAINING: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """``dx`` on a 2-D tile or one part (body or edges) of a split tile; the per-channel values
    come broadcastable to the tile."""
    dy = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(ACC)
    if TRAINING:
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean) * invstd
        dx = scale * (dy - mean_dy - xhat * mean_dyxhat)
    else:
        dx = scale * dy
    tl.store(dx_ptr + g_off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _param_grad(num_channels: int, needed: bool, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised ``[C]`` gradient, or an empty ``[0]`` one when not ``needed``."""
    return torch.empty(num_channels if needed else 0, dtype=dtype, device=device)


def bn_backward(
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
    """``(dx, dw, db)`` of bounded BN given the output gradient ``dy``.

    ``mean``/``var`` are what the forward normalised with: batch mean and biased variance
    (``training``) or the running statistics (eval, treated as constants). ``penalty_grad`` is the
    upstream gradient ``g`` of the per-channel penalty (``None``: the penalty is not in the loss).
    ``output_mask`` says which of ``dx, dw, db`` to compute; the others come back as empty ``[0]``
    tensors. ``dx`` has ``x``'s dtype and memory format; ``dw``/``db`` are float32 (float64 for a
    float64 ``x``) ``[C]``. ``dy`` may have any layout whose spatial dims collapse (NCHW or
    channels_last), independently of ``x``. ``out`` (tests) supplies pre-allocated outputs.
    """
    need_dx, need_dw, need_db = (bool(v) for v in output_mask)
    if need_dw and weight is None:
        raise ValueError("bn_backward: output_mask asks for dw but weight is None")
    x = kernel_ready(x)
    dy = kernel_ready(dy)
    mean, var = vector(mean), vector(var)
    weight = vector(weight)  # penalty_grad is read with its stride (0 when expanded)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    acc = acc_dtype(x.dtype)
    dev = x.device
    given = out if out is not None else (None, None, None)
    dx = (given[0] if given[0] is not None else alloc_like(x)) if need_dx else x.new_empty(0)
    dw = given[1] if given[1] is not None else _param_grad(num_channels, need_dw, acc, dev)
    db = given[2] if given[2] is not None else _param_grad(num_channels, need_db, acc, dev)
    has_g = need_dw and penalty_grad is not None
    need_sums = need_dw or need_db or (need_dx and training)
    if num_channels == 0 or not (need_sums or (need_dx and n_pos)):
        return dx, dw, db
    ensure_launchable(_bn_bwd_dx_kernel, x)

    dv, xv = view3(dy), view3(x)
    gv = view3(dx) if need_dx else xv
    # The tile shape follows the layout of x (dx is allocated like it); dy may differ.
    flat, cfg = layout_config([xv, dv, gv], num_channels, config)
    num_cblocks = triton.cdiv(num_channels, cfg.block_c)
    hw = n_pos // x.shape[0] if x.shape[0] else 0
    acc_tl = tl_dtype(x.dtype)
    with device_guard(x):
        if need_sums:
            red_flat, red_hw, red_align, red_split, chunk, num_chunks = reduction_tiles(
                [xv, dv], x, num_channels, n_pos, flat, cfg, num_cblocks, split=True)  # fmt: skip
            check_positions(n_pos, chunk)
            rows = max(num_chunks, 1)  # never a zero-size buffer
            sum_dy_part = torch.empty((rows, num_channels), dtype=acc, device=dev)
            sum_dyxmu_part = torch.empty((rows, num_channels), dtype=acc, device=dev)
            sum_dy = torch.empty(num_channels, dtype=acc, device=dev)
            sum_dyxhat = torch.empty(num_channels, dtype=acc, device=dev)
            if num_chunks:
                _bn_bwd_partial_kernel[(num_chunks, num_cblocks)](
                    dy, x, mean, sum_dy_part, sum_dyxmu_part,
                    num_channels, hw, n_pos,
                    *dv.strides(red_flat), *xv.strides(red_flat), chunk,
                    BLOCK_C=cfg.block_c, BLOCK_M=cfg.red_block_m, FLAT=int(red_flat),
                    ACC=acc_tl, BLOCK_HW=red_hw, ALIGN=red_align, SPLIT=red_split,
                    num_warps=cfg.num_warps,
                )  # fmt: skip
            _bn_bwd_combine_kernel[(triton.cdiv(num_channels, cfg.comb_block_c),)](
                sum_dy_part, sum_dyxmu_part, var,
                weight if weight is not None else var,  # any valid pointer when unused
                penalty_grad if has_g else var,
                sum_dy, sum_dyxhat,
                dw if need_dw else sum_dy, db if need_db else sum_dy,
                num_channels, num_chunks, penalty_grad.stride(0) if has_g else 0,
                float(eps), float(shift),
                BLOCK_C=cfg.comb_block_c, BLOCK_K=cfg.comb_block_k,
                HAS_G=int(has_g), WRITE_DW=int(need_dw), WRITE_DB=int(need_db),
                # 8 warps: at 4 the [32 x 64] accumulators plus the penalty's sigmoid/log pieces
                # spilled 4 bytes on sm_90 (benchmarks/aot_sm90.py).
                ACC=acc_tl, num_warps=8,
            )  # fmt: skip
        else:
            sum_dy = sum_dyxhat = var  # unread in eval mode
        if need_dx and n_pos:
            check_positions(n_pos, cfg.block_m)
            dx_flat, block_hw, align, split, tiles_m = position_tiles(
                [xv, dv, gv], x, num_channels, n_pos, flat, cfg)  # fmt: skip
            _bn_bwd_dx_kernel[(tiles_m, num_cblocks)](
                dy, x, dx, mean, var,
                weight if weight is not None else var,
                sum_dy, sum_dyxhat,
                num_channels, hw, n_pos, float(eps),
                *dv.strides(dx_flat), *xv.strides(dx_flat), *gv.strides(dx_flat),
                BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, FLAT=int(dx_flat),
                HAS_W=int(weight is not None), TRAINING=int(bool(training)),
                ACC=acc_tl, BLOCK_HW=block_hw, ALIGN=align, SPLIT=split, num_warps=cfg.num_warps,
            )  # fmt: skip
    return dx, dw, db


def bn_backward_sums(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    penalty_grad: Tensor | None,
    eps: float,
    shift: float,
    sums: Tensor,
    need_dw: bool = True,
    need_db: bool = True,
    *,
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """This process's per-channel sums for a distributed backward, and its ``(dw, db)`` shares.

    Writes ``sums[0] = sum(dy)`` and ``sums[1] = sum(dy * xhat)`` (``xhat`` with the given, e.g.
    global, ``mean``/``var``) into the ``[2, C]`` accumulation-dtype buffer ``sums`` (one
    all-reduce away from the global sums), and returns ``dw = a (1 - a) sums[1] + g dR/dw`` and
    ``db = sums[0]`` of the local positions (empty ``[0]`` when not needed). Partials + combine:
    two launches; ``x`` must have at least one position.
    """
    x, dy = kernel_ready(x), kernel_ready(dy)
    mean, var, weight = vector(mean), vector(var), vector(weight)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels
    if n_pos == 0 or sums.shape != (2, num_channels) or not sums.is_contiguous():
        raise ValueError("bn_backward_sums needs positions and a contiguous [2, C] sums buffer")
    ensure_launchable(_bn_bwd_partial_kernel, x)
    acc = acc_dtype(x.dtype)
    dev = x.device
    dw = _param_grad(num_channels, need_dw, acc, dev)
    db = _param_grad(num_channels, need_db, acc, dev)
    has_g = need_dw and penalty_grad is not None
    dv, xv = view3(dy), view3(x)
    flat, cfg = layout_config([xv, dv], num_channels, config)
    num_cblocks = triton.cdiv(num_channels, cfg.block_c)
    flat, block_hw, align, split, chunk, num_chunks = reduction_tiles(
        [xv, dv], x, num_channels, n_pos, flat, cfg, num_cblocks, split=True)  # fmt: skip
    check_positions(n_pos, chunk)
    part = torch.empty((2, num_chunks, num_channels), dtype=acc, device=dev)
    acc_tl = tl_dtype(x.dtype)
    with device_guard(x):
        _bn_bwd_partial_kernel[(num_chunks, num_cblocks)](
            dy, x, mean, part[0], part[1],
            num_channels, n_pos // x.shape[0], n_pos,
            *dv.strides(flat), *xv.strides(flat), chunk,
            BLOCK_C=cfg.block_c, BLOCK_M=cfg.red_block_m, FLAT=int(flat),
            ACC=acc_tl, BLOCK_HW=block_hw, ALIGN=align, SPLIT=split, num_warps=cfg.num_warps,
        )  # fmt: skip
        _bn_bwd_combine_kernel[(triton.cdiv(num_channels, cfg.comb_block_c),)](
            part[0], part[1], var,
            weight if weight is not None else var,
            penalty_grad if has_g else var,
            sums[0], sums[1],
            dw if need_dw else var, db if need_db else var,
            num_channels, num_chunks, penalty_grad.stride(0) if has_g else 0,
            float(eps), float(shift),
            BLOCK_C=cfg.comb_block_c, BLOCK_K=cfg.comb_block_k,
            HAS_G=int(has_g), WRITE_DW=int(need_dw), WRITE_DB=int(need_db),
            ACC=acc_tl, num_warps=8,
        )  # fmt: skip
    return dw, db


def bn_backward_dx(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    means: Tensor,
    eps: float,
    *,
    config: BNConfig | None = None,
) -> Tensor:
    """``dx = a invstd (dy - means[0] - xhat means[1])`` with given (e.g. global) mean gradients.

    ``means`` is ``[2, C]``: ``mean(dy)`` and ``mean(dy * xhat)`` over whatever batch the
    statistics span (all ranks, for ``SyncBoundedBatchNorm2d``). One launch.
    """
    x, dy = kernel_ready(x), kernel_ready(dy)
    mean, var, weight = vector(mean), vector(var), vector(weight)
    num_channels = x.shape[1]
    n_pos = x.numel() // num_channels if num_channels else 0
    dx = alloc_like(x)
    if n_pos == 0:
        return dx
    ensure_launchable(_bn_bwd_dx_kernel, x)
    dv, xv, gv = view3(dy), view3(x), view3(dx)
    flat, cfg = layout_config([xv, dv, gv], num_channels, config)
    check_positions(n_pos, cfg.block_m)
    flat, block_hw, align, split, tiles_m = position_tiles([xv, dv, gv], x, num_channels, n_pos,
                                                           flat, cfg)  # fmt: skip
    grid = (tiles_m, triton.cdiv(num_channels, cfg.block_c))
    with device_guard(x):
        _bn_bwd_dx_kernel[grid](
            dy, x, dx, mean, var,
            weight if weight is not None else var,
            means[0], means[1],
            num_channels, n_pos // x.shape[0], n_pos, float(eps),
            *dv.strides(flat), *xv.strides(flat), *gv.strides(flat),
            BLOCK_C=cfg.block_c, BLOCK_M=cfg.block_m, FLAT=int(flat),
            HAS_W=int(weight is not None), TRAINING=1, ACC=tl_dtype(x.dtype), num_warps=cfg.num_warps,
            MEANS=1, BLOCK_HW=block_hw, ALIGN=align, SPLIT=split,
        )  # fmt: skip
    return dx
