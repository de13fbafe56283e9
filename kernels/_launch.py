"""Launch plumbing shared by the bounded-BN launchers: device checks, dtypes, layouts, configs."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._config import (
    BNConfig,
    bn_config,
    image_tiles,
    plan_chunks,
    plan_image_chunks,
    split_tiles,
)
from ._layout import View3, acc_dtype, spatial_stride, view3

__all__ = [
    "RUNTIME_SIZES",
    "acc_dtype",
    "channels_contiguous",
    "check_positions",
    "device_guard",
    "ensure_launchable",
    "kernel_ready",
    "layout_config",
    "position_tiles",
    "reduction_tiles",
    "slice_tiles",
    "running_args",
    "tl_dtype",
    "vector",
    "view3",
]

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# Kernel arguments that change with the batch or image size (positions, chunking, the batch
# stride): every kernel lists them in ``do_not_specialize``, so Triton does not compile a variant
# per value class (== 1, divisible by 16) and a new batch or image size reuses the compiled
# kernels. Constexprs are tile shapes and flags only.
RUNTIME_SIZES = ["HW", "n_pos", "K", "CHUNK", "s_xn", "s_yn", "s_dn", "s_gn"]


def tl_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for torch ``dtype`` (float32 or float64)."""
    return _TL_DTYPES[acc_dtype(dtype)]


def ensure_launchable(kernel, t: Tensor) -> None:
    """Raise a clear error where ``kernel`` cannot run on ``t``'s device.

    CPU tensors need the Triton interpreter, which Triton picks when a kernel is *defined*: the
    environment variable must be set before ``rnip_ext.kernels`` is first imported.
    """
    if t.device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        set_now = os.environ.get("TRITON_INTERPRET", "") == "1"
        raise RuntimeError(
            "rnip_ext's Triton kernels got a CPU tensor, which needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before rnip_ext.kernels is first imported"
            + (" (it is set now, but the kernels were imported before it was)" if set_now else "")
            + ", or use the eager backend (RNIP_BACKEND=eager)"
        )


def check_positions(n_pos: int, block: int) -> None:
    """Positions are indexed in int32 (element offsets are int64): ``n_pos + block < 2**31``."""
    if n_pos + block >= 2**31:
        raise ValueError(
            f"the bounded-BN kernels take fewer than 2**31 positions per channel, got {n_pos}"
        )


def device_guard(t: Tensor):
    """Make ``t``'s GPU the current device for the launch (Triton launches on the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def kernel_ready(t: Tensor) -> Tensor:
    """``t`` itself when its spatial dims collapse to one stride (NCHW, channels_last), else a copy.

    Only exotic layouts (permuted spatial dims) are copied; the hot path never is.
    """
    return t if spatial_stride(t) is not None else t.contiguous()


def layout_config(views: list[View3], num_channels: int, config: BNConfig | None):
    """``(flat, config)`` for a launch over tensors described by ``views`` (the first one leads).

    The tile shape follows the first (leading) tensor: channels contiguous (channels_last, or one
    position per image) picks wide-channel tiles, otherwise long position runs.
    """
    flat = all(v.s_m is not None for v in views)
    if config is None:
        config = bn_config(num_channels, channels_contiguous(views[0], num_channels))
    return flat, config


def position_tiles(views: list[View3], x: Tensor, num_channels: int, n_pos: int, flat: bool,
                   config: BNConfig):  # fmt: skip
    """``(flat, BLOCK_HW, ALIGN, SPLIT, programs along positions)`` of an elementwise launch.

    NCHW tiles (the config spans few channels) whose ``H*W`` shares a power-of-two factor with
    every tensor's strides become image tiles (``_config.image_tiles``, which vectorise); those
    with odd ``H*W`` become split tiles (``_config.split_tiles``: a vector body and scalar edges
    per plane, ``SPLIT = 1``); the others stay flat over ``N*H*W`` (``BLOCK_HW = 0``).
    """
    hw = n_pos // x.shape[0]
    block_hw, align, split = 0, 1, 0
    if not channels_contiguous(views[0], num_channels):
        strides = [(v.s_n, v.s_c, v.s_hw) for v in views]
        block_hw, align = image_tiles(hw, config.block_m, x.element_size(), strides)
        if block_hw == 0:
            block_hw, align = split_tiles(hw, config.block_m, x.element_size(), strides)
            split = int(block_hw > 0)
    if block_hw == 0:
        return flat, 0, 1, 0, triton.cdiv(n_pos, config.block_m)
    images_per_tile = config.block_m // block_hw
    row = hw - hw % align if split else hw  # split tiles: row blocks cover the widest body
    tiles = triton.cdiv(x.shape[0], images_per_tile) * triton.cdiv(row, block_hw)
    return False, block_hw, align, split, tiles


def reduction_tiles(views: list[View3], x: Tensor, num_channels: int, n_pos: int, flat: bool,
                    config: BNConfig, num_cblocks: int, split: bool = False):  # fmt: skip
    """``(flat, BLOCK_HW, ALIGN, SPLIT, chunk, num_chunks)`` of a reduction-partials launch.

    NCHW launches whose ``H*W`` gets image tiles (``_config.image_tiles`` with the reduction
    tile ``red_block_m``) loop over image tiles, in chunks of whole images
    (``_config.plan_image_chunks``); with ``split`` (the backward sums) odd ``H*W`` likewise over
    split tiles (``_config.split_tiles``, ``SPLIT = 1``); the others over flat tiles of ``N*H*W``
    positions (``_config.plan_chunks``). The statistics kernel does not take split tiles: a
    split tile's body length varies from plane to plane, which its per-lane Welford counts
    cannot follow without a division per element.
    """
    if n_pos > 0 and not channels_contiguous(views[0], num_channels):
        hw = n_pos // x.shape[0]
        strides = [(v.s_n, v.s_c, v.s_hw) for v in views]
        block_hw, align = image_tiles(hw, config.red_block_m, x.element_size(), strides)
        is_split = 0
        if block_hw == 0 and split:
            block_hw, align = split_tiles(hw, config.red_block_m, x.element_size(), strides)
            is_split = int(block_hw > 0)
        if block_hw:
            chunk, num_chunks = plan_image_chunks(x.shape[0], hw, block_hw, num_cblocks, config,
                                                  x.device)  # fmt: skip
            return False, block_hw, align, is_split, chunk, num_chunks
    chunk, num_chunks = plan_chunks(n_pos, num_cblocks, config, x.device)
    return flat, 0, 1, 0, chunk, num_chunks


def slice_tiles(views: list[View3], x: Tensor, n_pos: int, flat: bool, single_m: int):
    """``(flat, BLOCK_HW, ALIGN, SPLIT)`` of a single-pass launch, whose one tile holds the slice.

    Image tiles (``_config.image_tiles`` with rows as wide as an image) when every image fits
    one row and all ``N`` rows fit ``single_m`` (``N * next_pow2(H*W) <= single_m``; true for
    power-of-two images such as CIFAR's 2x2/4x4/8x8); for odd ``H*W`` (7x7) split tiles
    (``_config.split_tiles``) under the same condition on the body row
    (``N * next_pow2(ALIGN floor(H*W / ALIGN)) <= single_m``; the edge lanes come on top); else
    flat tiles.
    """
    hw = n_pos // x.shape[0]
    strides = [(v.s_n, v.s_c, v.s_hw) for v in views]
    block_hw, align = image_tiles(hw, single_m, x.element_size(), strides, cap=single_m)
    if block_hw and block_hw >= hw and x.shape[0] * block_hw <= single_m:
        return False, block_hw, align, 0
    block_hw, align = split_tiles(hw, single_m, x.element_size(), strides, cap=single_m)
    if block_hw and block_hw >= hw - hw % align and x.shape[0] * block_hw <= single_m:
        return False, block_hw, align, 1
    return flat, 0, 1, 0


def channels_contiguous(lead: View3, num_channels: int) -> bool:
    """Whether a tile should span channels (channels_last, one position per image) or positions."""
    positions_contiguous = lead.s_m == 1 or (lead.s_m is None and lead.s_hw == 1)
    return lead.s_c == 1 and num_channels > 1 and not positions_contiguous


def vector(t: Tensor | None) -> Tensor | None:
    """A per-channel ``[C]`` tensor with unit stride, as the kernels index it (``None`` stays).

    A no-op for parameters and buffers; copies ``C`` values for views such as the stride-0
    gradient that ``penalty.sum()`` sends back.
    """
    return None if t is None else t.contiguous()


def running_args(
    running: tuple[Tensor, Tensor] | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    placeholder: Tensor,
    n_pos: int,
):
    """Kernel arguments of an ``nn.BatchNorm2d`` training step's bookkeeping, done on device.

    Returns ``(running_mean, running_var, num_batches_tracked, momentum, UPDATE_RUNNING,
    CUMULATIVE, COUNT)``. ``num_batches_tracked`` (when given) is incremented once per call: by
    the kernel (``COUNT``, one program stores ``n + 1``; nobody reads it in that launch), except
    when the kernel itself needs the new count (``momentum=None``: ``f = 1 / count``, read by
    every program) or there are no positions; then here, as one in-place add before the launch.
    ``momentum`` goes as a plain float argument (no host-to-device copy per step); an empty batch
    (``n_pos == 0``) moves no statistics. ``placeholder`` stands in for unused pointers.
    """
    if num_batches_tracked is not None and (
        num_batches_tracked.numel() != 1 or num_batches_tracked.device != placeholder.device
    ):
        raise ValueError("num_batches_tracked must be a one-element tensor on the input's device")
    if running is None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return placeholder, placeholder, placeholder, 0.0, 0, 0, 0
    running_mean, running_var = running
    for name, buf in (("running_mean", running_mean), ("running_var", running_var)):
        if buf.dim() != 1 or buf.stride(0) != 1 or buf.shape[0] != placeholder.shape[0]:
            raise ValueError(f"{name} must be a contiguous [C] tensor, got {tuple(buf.shape)}")
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    count = num_batches_tracked is not None and momentum is not None and n_pos > 0
    if num_batches_tracked is not None and not count:
        num_batches_tracked.add_(1)
    nbt = num_batches_tracked if num_batches_tracked is not None else placeholder
    if n_pos == 0:
        return placeholder, placeholder, placeholder, 0.0, 0, 0, 0
    if momentum is None:
        return running_mean, running_var, nbt, 0.0, 1, 1, 0
    return running_mean, running_var, nbt, float(momentum), 1, 0, int(count)
