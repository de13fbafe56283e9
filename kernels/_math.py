"""Device helpers shared by the bounded-BN kernels: stable sigmoid pieces and position offsets.

For ``z`` (fp32 or fp64), with ``e = exp(-|z|)`` in ``(0, 1]``::

    s      = sigmoid(z)  = 1 / (1 + e)       (z >= 0)    e / (1 + e)   (z < 0)
    1 - s  = sigmoid(-z) = e / (1 + e)       (z >= 0)    1 / (1 + e)   (z < 0)
    log s  = logsigmoid(z) = min(z, 0) - log1p(e)

No ``exp`` of a positive number and no ``1 - s`` subtraction, so every piece keeps its relative
precision and stays finite for any finite ``z`` (|z| = 1e4 included). The receding penalty and its
derivative follow: ``p = s * (1 - log s)``, ``dp/dz = -log(s) * s * (1 - s)``.
"""

import triton
import triton.language as tl


@triton.jit
def log1p_unit(u):
    """``log(1 + u)`` for ``u`` in ``[0, 1]``, accurate for tiny ``u`` (Goldberg's correction)."""
    w = 1.0 + u
    d = w - 1.0
    # log(w) * u / (w - 1) cancels the rounding of 1 + u; for w == 1 exactly, log1p(u) = u.
    return tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def sigmoid_parts(z):
    """``(sigmoid(z), sigmoid(-z), logsigmoid(z))``, each computed stably."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    nonneg = z >= 0.0
    s = tl.where(nonneg, r, e * r)
    one_minus_s = tl.where(nonneg, e * r, r)
    log_s = tl.minimum(z, 0.0) - log1p_unit(e)
    return s, one_minus_s, log_s


@triton.jit
def position_offsets(offs_m, HW, s_n, s_hw, FLAT: tl.constexpr):
    """int64 element offsets of positions ``offs_m`` (int32) of a ``[N, C, HW]`` tensor.

    With ``FLAT`` the positions are evenly spaced and ``s_hw`` is that spacing (``s_n`` unused).
    """
    if FLAT:
        return offs_m.to(tl.int64) * s_hw
    else:
        n_idx = offs_m // HW
        hw_idx = offs_m - n_idx * HW
        return n_idx.to(tl.int64) * s_n + hw_idx.to(tl.int64) * s_hw


@triton.jit
def aligned(v, ALIGN: tl.constexpr):
    """``v`` (an integer the launcher guarantees divisible by ``ALIGN``), with that divisibility
    visible to the compiler: ``(v // ALIGN) * ALIGN`` is two shifts, and lets it prove that rows
    start on a vector boundary (Triton itself only specialises divisibility by 16)."""
    return (v // ALIGN) * ALIGN


@triton.jit
def tile_positions(pid_m, HW, n_pos, BLOCK_M: tl.constexpr, BLOCK_HW: tl.constexpr,
                   ALIGN: tl.constexpr):  # fmt: skip
    """``(a, b, mask)`` locating the ``BLOCK_M`` positions of position tile ``pid_m``.

    ``BLOCK_HW == 0``: flat tiles of ``N*HW`` positions; ``a = b = m`` (feed
    :func:`position_offsets`). ``BLOCK_HW > 0`` (NCHW, unit ``H*W`` stride): a 2-D tile of
    ``BLOCK_M // BLOCK_HW`` images x ``BLOCK_HW`` positions of ``H*W``; ``a`` is the image and
    ``b`` the position in it, so a row is one contiguous run starting on an ``ALIGN``-element
    boundary and its mask is constant over ``ALIGN`` lanes: the loads vectorise whatever ``H*W``
    is (``ALIGN`` divides ``H*W``). Tiles run over ``cdiv(HW, BLOCK_HW)`` row blocks per group
    of images.
    """
    if BLOCK_HW == 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        return offs_m, offs_m, offs_m < n_pos
    else:
        hw = aligned(HW, ALIGN)
        num_images = n_pos // HW
        hw_tiles = tl.cdiv(hw, BLOCK_HW)
        n_blk = pid_m // hw_tiles
        hw_blk = pid_m - n_blk * hw_tiles
        j = tl.arange(0, BLOCK_M)
        n_idx = n_blk * (BLOCK_M // BLOCK_HW) + j // BLOCK_HW
        hw_idx = hw_blk * BLOCK_HW + j % BLOCK_HW
        return n_idx, hw_idx, (n_idx < num_images) & (hw_idx < hw)


@triton.jit
def tile_offsets(a, b, HW, s_n, s_hw, FLAT: tl.constexpr, BLOCK_HW: tl.constexpr,
                 ALIGN: tl.constexpr):  # fmt: skip
    """int64 element offsets (channel term excluded) of the positions :func:`tile_positions`
    gave; with ``BLOCK_HW > 0`` the ``H*W`` stride is 1 and ``ALIGN`` divides ``s_n``."""
    if BLOCK_HW == 0:
        return position_offsets(a, HW, s_n, s_hw, FLAT)
    else:
        return a.to(tl.int64) * aligned(s_n, ALIGN) + b


@triton.jit
def channel_tile_offsets(offs_c, a, b, HW, s_n, s_c, s_hw, FLAT: tl.constexpr, BLOCK_HW: tl.constexpr,
                         ALIGN: tl.constexpr):  # fmt: skip
    """int64 element offsets of the ``[channels, positions]`` tile of channels ``offs_c`` at the
    positions :func:`tile_positions` gave, in a tensor of strides ``(s_n, s_c, s_hw)``."""
    return offs_c.to(tl.int64)[:, None] * aligned(s_c, ALIGN) + tile_offsets(a, b, HW, s_n, s_hw, FLAT, BLOCK_HW,
                                                                              ALIGN)[None, :]  # fmt: skip


@triton.jit
def scale_and_shift(w_ptr, b_ptr, offs_c, mask_c, var, eps, ACC: tl.constexpr):
    """Per channel ``scale = rsqrt(var + eps) * sigmoid(w)`` (no ``sigmoid(w)`` without a weight:
    ``w_ptr`` None), the shift ``b`` (zeros without ``b_ptr``), ``y = (x - mean) * scale + b``, and
    the logits ``w`` it loaded (zeros without a weight; e.g. for the receding penalty)."""
    scale = tl.rsqrt(var + eps)
    if w_ptr is not None:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        a, _, _ = sigmoid_parts(w)
        scale = scale * a
    else:
        w = tl.zeros_like(scale)
    if b_ptr is not None:
        b = tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    else:
        b = tl.zeros_like(scale)
    return scale, b, w


@triton.jit
def chunk_image_lanes(pid_k, HW, n_pos, CHUNK, SEG, BLOCK_M: tl.constexpr, BLOCK_HW: tl.constexpr,
                      ALIGN: tl.constexpr):  # fmt: skip
    """Image (or split-tile) rows of reduction chunk ``pid_k`` (``_config.plan_image_chunks``):
    ``CHUNK`` images per chunk, ``SEG`` row blocks of ``BLOCK_HW`` positions per segment. Returns
    the row width ``hw`` (``H*W``; a split tile's widest body ``ALIGN floor(H*W / ALIGN)``), the chunk's row blocks ``[r0, r1)`` and whether they include the last one
    (``last``, 0/1), its images ``[n_start, n_end)`` and each of the ``BLOCK_M`` lanes' image in
    the group (``j_n``) and position in the row block (``j_hw``)."""
    hw = aligned(HW, ALIGN)
    row_blocks = tl.cdiv(hw, BLOCK_HW)
    segments = tl.cdiv(row_blocks, SEG)
    seg = pid_k % segments
    r0 = seg * SEG
    r1 = tl.minimum(r0 + SEG, row_blocks)
    n_start = (pid_k // segments) * CHUNK
    n_end = tl.minimum(n_start + CHUNK, n_pos // HW)
    j = tl.arange(0, BLOCK_M)
    return hw, r0, r1, (r1 == row_blocks).to(tl.int32), n_start, n_end, j // BLOCK_HW, j % BLOCK_HW


@triton.jit
def split_rows(pid_m, HW, n_pos, BLOCK_M: tl.constexpr, BLOCK_HW: tl.constexpr,
               ALIGN: tl.constexpr):  # fmt: skip
    """``(n_idx, q, e, mask_n, edge_hw)`` of split tile ``pid_m`` (``_config.split_tiles``).

    The tile spans ``BLOCK_M // BLOCK_HW`` images ``n_idx`` (valid where ``mask_n``), body
    positions ``q`` (``BLOCK_HW`` of them, row block ``pid_m mod cdiv(ALIGN floor(HW / ALIGN),
    BLOCK_HW)``) and ``2 * ALIGN`` edge lanes ``e``; only the first row block does the edges
    (``edge_hw`` is ``HW`` there, 0 elsewhere: an integer, as the interpreter cannot mask with a
    scalar boolean). Feed :func:`split_offsets`.
    """
    num_images = n_pos // HW
    hw_tiles = tl.maximum(tl.cdiv(aligned(HW, ALIGN), BLOCK_HW), 1)
    n_blk = pid_m // hw_tiles
    hw_blk = pid_m - n_blk * hw_tiles
    n_idx = n_blk * (BLOCK_M // BLOCK_HW) + tl.arange(0, BLOCK_M // BLOCK_HW)
    q = hw_blk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    e = tl.arange(0, 2 * ALIGN)
    return n_idx, q, e, n_idx < num_images, HW - HW * tl.minimum(hw_blk, 1)


@triton.jit
def split_offsets(offs_c, mask_c, n_idx, mask_n, q, e, edge_hw, HW, s_n, s_c,
                  ALIGN: tl.constexpr):  # fmt: skip
    """``(body_off, body_mask, edge_off, edge_mask)`` of one tensor in a split tile.

    ``body_off`` is ``[BLOCK_C, images, BLOCK_HW]``, ``edge_off`` ``[BLOCK_C, images, 2 ALIGN]``
    (int64 element offsets). Plane ``(n, c)`` starts at ``o = n s_n + c s_c``; its positions
    ``[0, head)`` (``head = (-o) mod ALIGN``) go to edge lanes ``e < ALIGN``, ``[head, head +
    body)`` (``body = ALIGN floor((HW - head) / ALIGN)``) to the body, which starts at an address
    divisible by ``ALIGN`` and whose row limit is constant along the last axis (so the loads stay
    vectors), and the tail ``[head + body, HW)`` to edge lanes ``e >= ALIGN``. Every tensor of a
    launch has ``(s_n, s_c)`` congruent modulo ``ALIGN`` (the launcher checks), so they all split
    at the same positions.
    """
    plane = offs_c.to(tl.int64)[:, None, None] * s_c + n_idx.to(tl.int64)[None, :, None] * s_n
    head = tl.minimum((ALIGN - plane % ALIGN) % ALIGN, HW)
    body = aligned(HW - head, ALIGN)
    rows = mask_c[:, None, None] & mask_n[None, :, None]
    q3 = q[None, None, :]
    body_off = aligned(plane + head, ALIGN) + q3
    body_mask = rows & (q3 < body)
    e3 = e[None, None, :]
    is_head = e3 < ALIGN
    pos = tl.where(is_head, e3, head + body + (e3 - ALIGN))
    in_head = is_head & (e3 < head) & (e3 < edge_hw)
    in_tail = (e3 >= ALIGN) & (pos < edge_hw)
    edge_mask = rows & (in_head | in_tail)
    return body_off, body_mask, plane + pos, edge_mask


@triton.jit
def channel_sum(t):
    """Per-channel sum of a ``[BLOCK_C, images, width]`` split-tile part."""
    return tl.sum(tl.sum(t, axis=2), axis=1)


@triton.jit
def update_running(
    rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c, mean, var, n, momentum,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Running statistics as ``nn.BatchNorm2d`` updates them, for channels ``offs_c``::

        f = momentum   (or 1 / num_batches_tracked with CUMULATIVE: momentum=None)
        running_mean += f * (mean - running_mean)
        running_var  += f * (var * n / (n - 1) - running_var)      (n = 1: var)

    ``var`` is the biased batch variance over ``n`` positions; with ``CUMULATIVE`` the caller has
    already incremented ``num_batches_tracked``.
    """
    if CUMULATIVE:
        f = 1.0 / tl.load(nbt_ptr).to(ACC)
    else:
        f = tl.zeros_like(mean) + momentum  # a float32 kernel argument (fp64 runs: 1e-8 rel.)
    unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
    rm = tl.load(rmean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    rv = tl.load(rvar_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    tl.store(rmean_ptr + offs_c, (rm + f * (mean - rm)).to(rmean_ptr.dtype.element_ty), mask=mask_c)
    tl.store(rvar_ptr + offs_c, (rv + f * (unbiased - rv)).to(rvar_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def count_batch(nbt_ptr, pid, RUNNING: tl.constexpr):
    """``num_batches_tracked += 1`` by program ``pid == 0`` when the launch counts the batch
    (``RUNNING == 1``, ``_launch.RUNNING_COUNT``); nobody else reads it in that launch."""
    if RUNNING == 1:
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
