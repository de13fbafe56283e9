"""Launch plans: every choice a launcher makes from its input's layout, made once and cached.

A :class:`Plan` holds, for one ``(shape, strides, dtype, device, config)`` of ``x``, the path
(single-pass or chunked, ``_config.single_pass_config``), the tiles and chunking
(``_config``), and for each kernel its grid, integer arguments (sizes, strides, chunking),
constexprs and warps. The launchers look it up (:func:`plan`: one dictionary lookup, ~1 us) and
then only allocate outputs and launch; the flags that change per call (a weight or not, a
penalty or not, which gradients, the running-statistics mode) are ``None`` pointers or the
kernels' last constexpr, passed at the call. Nothing here reads tensor values, so planning works
on ``meta`` tensors (``_variants.step_launches``) and is what the planner tests inspect.

The cache is bounded (:data:`MAX_PLANS` keys; it is cleared when full, plans being cheap to
rebuild): a network has a few dozen layer layouts, times a few batch sizes.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
from torch import Tensor

from ._config import BNConfig, bn_config, image_tiles, plan_chunks, plan_image_chunks, single_pass_config, split_tiles
from ._launch import tl_dtype
from ._layout import Geometry, acc_dtype, dense_strides, geometry

__all__ = ["Launch", "Plan", "MAX_PLANS", "check_out", "plan", "plan_for", "prepared"]

MAX_PLANS = 4096


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch but its tensors and per-call values: ``kernel[grid](*pointers, *sizes,
    <floats>, *consts, <per-call flags>, num_warps=num_warps)``."""

    grid: tuple[int, ...]
    sizes: tuple[int, ...]
    consts: tuple
    num_warps: int

    @property
    def programs(self) -> int:
        total = 1
        for g in self.grid:
            total *= g
        return total


@dataclasses.dataclass(frozen=True)
class Reduction:
    """Partials + combine of a reduction over positions (statistics, or backward sums)."""

    partials: Launch | None  # None when there are no positions (no chunks)
    combine: Launch
    num_chunks: int
    chunk_positions: int  # positions of the largest chunk (for the partial-traffic bound)

    # Rows of each [K, C] partial buffer: K, at least one (the combine kernel never gets a
    # zero-size buffer). The launchers allocate each buffer on its own, not as views of one: a
    # view's offset (K * C) would change the pointer's 16-byte alignment, i.e. the compiled
    # variant, with the batch size (and a view costs the host about what an allocation does).
    rows: int = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the launchers need for one input layout (see the module docstring).

    ``single``: the single-pass kernels' launch (forward and backward share it), ``None`` for the
    chunked path. ``elementwise``: normalise / dx (``None`` without positions). ``stats`` /
    ``sums``: the forward's statistics and the backward's sums reductions. ``acc``: the
    accumulation dtype (``_layout.acc_dtype``); ``n_pos``: positions per channel, ``N*H*W``;
    ``shape``, ``strides``, ``dtype``, ``device``: the input's, which its outputs (``y``, ``dx``)
    share (read from here, the launchers skip ``x.shape`` / ``x.device`` calls).
    """

    single: Launch | None
    elementwise: Launch | None
    stats: Reduction | None
    sums: Reduction | None
    dense: bool = True  # False: the kernels cannot read x in place (see prepared)
    acc: torch.dtype | None = None
    n_pos: int = 0
    shape: tuple = ()
    strides: tuple = ()
    dtype: torch.dtype | None = None
    device: torch.device | None = None


_CACHE: dict = {}


def plan(x: Tensor, config: BNConfig | None = None) -> Plan:
    """The cached :class:`Plan` of ``x`` (``dense=False`` when the kernels cannot read it in place:
    use :func:`prepared`). ``config``
    (tests, benchmarks) overrides the tiles: a single-pass one (``single_m > 0``) forces that
    path, another one the chunked path with its tiles."""
    key = (x.shape, x.stride(), x.dtype, x.device, config)
    found = _CACHE.get(key)
    return _build(key) if found is None else found


def _build(key) -> Plan:
    """Plan ``key`` (a cache miss) and cache it."""
    if len(_CACHE) >= MAX_PLANS:
        _CACHE.clear()
    shape, strides, dtype, device, config = key
    found = _CACHE[key] = plan_for(tuple(shape), tuple(strides), dtype, device, config)
    return found


def prepared(x: Tensor, config: BNConfig | None = None) -> tuple[Tensor, Plan]:
    """``(x, plan)`` with ``x`` as the kernels read it: itself when dense with collapsible spatial
    dims (``_layout.dense_layout``; decided once per layout, with its plan), else an NCHW copy."""
    # plan()'s lookup inlined: this runs on every launcher call.
    key = (x.shape, x.stride(), x.dtype, x.device, config)
    found = _CACHE.get(key) or _build(key)
    if not found.dense:
        x = x.contiguous()
        found = plan(x, config)
    return x, found


def check_out(out: Tensor, x: Tensor) -> Tensor:
    """``out`` (a test's pre-poisoned output), which must have ``x``'s shape and strides."""
    if out.shape != x.shape or out.stride() != x.stride():
        raise ValueError(f"out must have x's shape {tuple(x.shape)} and strides {x.stride()}, got "
                         f"{tuple(out.shape)} and {out.stride()}")  # fmt: skip
    return out


def channels_contiguous(g: Geometry) -> bool:
    """Whether a tile should span channels (channels_last, one position per image) or positions."""
    positions_contiguous = g.s_m == 1 or (g.s_m is None and g.s_hw == 1)
    return g.s_c == 1 and g.c > 1 and not positions_contiguous


def check_positions(n_pos: int, block: int) -> None:
    """Positions are indexed in int32 (element offsets are int64): ``n_pos + block < 2**31``."""
    if n_pos + block >= 2**31:
        raise ValueError(f"the bounded-BN kernels take fewer than 2**31 positions per channel, got {n_pos}")


def plan_for(shape, strides, dtype: torch.dtype, device: torch.device, config: BNConfig | None = None) -> Plan:
    """Build the :class:`Plan` of a tensor with these sizes and strides (no caching)."""
    if not dense_strides(shape, strides):
        return Plan(None, None, None, None, dense=False, device=device)
    g = geometry(shape, strides)
    acc = tl_dtype(dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    cl = channels_contiguous(g)
    if g.c == 0:
        return Plan(None, None, None, None, acc=acc_dtype(dtype), shape=tuple(shape), strides=tuple(strides),
                    dtype=dtype, device=device)  # fmt: skip
    single_cfg = None
    if config is not None and config.single_m:
        single_cfg = config
    elif config is None and g.n_pos:
        single_cfg = single_pass_config(g.n_pos, g.c, g.hw, cl, elem)
    tiles = config if config is not None and not config.single_m else bn_config(g.c, cl)
    single = _single(g, single_cfg, acc, elem) if single_cfg is not None and g.n_pos else None
    elementwise = _elementwise(g, tiles, acc, elem, cl) if g.n_pos else None
    stats = _reduction(g, tiles, acc, elem, cl, device, split=False, combine_warps=4)
    # 8 warps: at 4 the [32 x 64] accumulators plus the penalty's sigmoid/log pieces spilled
    # 4 bytes on sm_90 (benchmarks/aot_sm90.py).
    sums = _reduction(g, tiles, acc, elem, cl, device, split=True, combine_warps=8)
    return Plan(single, elementwise, stats, sums, acc=acc_dtype(dtype), n_pos=g.n_pos, shape=tuple(shape),
                strides=tuple(strides), dtype=dtype, device=device)  # fmt: skip


def _sizes(g: Geometry, flat: bool) -> tuple[int, ...]:
    return (g.c, g.hw, g.n_pos, *g.strides(flat))


def _single(g: Geometry, cfg: BNConfig, acc, elem: int) -> Launch:
    """The single-pass launch: one program holds ``block_c`` channels x the whole slice."""
    if not 1 <= g.n_pos <= cfg.single_m:
        raise ValueError(f"the single-pass kernels hold at most single_m = {cfg.single_m} positions per "
                         f"channel on chip and need at least one, got N*H*W = {g.n_pos}")  # fmt: skip
    check_positions(g.n_pos, cfg.single_m)
    flat, block_hw, align, split = slice_tiles(g, elem, cfg.single_m)
    return Launch((triton.cdiv(g.c, cfg.block_c),), _sizes(g, flat),
                  (cfg.block_c, cfg.single_m, int(flat), acc, block_hw, align, split), cfg.num_warps)  # fmt: skip


def _elementwise(g: Geometry, cfg: BNConfig, acc, elem: int, cl: bool) -> Launch:
    """Normalise / dx: one ``[block_c, block_m]`` tile per program (``position_tiles``)."""
    check_positions(g.n_pos, cfg.block_m)
    flat, block_hw, align, split, tiles_m = position_tiles(g, elem, cfg, cl)
    return Launch((tiles_m, triton.cdiv(g.c, cfg.block_c)), _sizes(g, flat),
                  (cfg.block_c, cfg.block_m, int(flat), acc, block_hw, align, split), cfg.num_warps)  # fmt: skip


def _reduction(g: Geometry, cfg: BNConfig, acc, elem: int, cl: bool, device, split: bool, combine_warps: int):
    num_cblocks = triton.cdiv(g.c, cfg.block_c)
    flat, block_hw, align, is_split, chunk, seg, num_chunks, chunk_positions = reduction_tiles(
        g, elem, cfg, cl, num_cblocks, device, split)  # fmt: skip
    check_positions(g.n_pos, max(chunk_positions, cfg.red_block_m))
    consts = (cfg.block_c, cfg.red_block_m, int(flat), acc, block_hw, align) + ((is_split,) if split else ())
    partials = None
    if num_chunks:
        partials = Launch((num_chunks, num_cblocks), _sizes(g, flat) + (chunk, seg), consts, cfg.num_warps)
    combine = Launch((triton.cdiv(g.c, cfg.comb_block_c),), (g.c, num_chunks),
                     (cfg.comb_block_c, cfg.comb_block_k, acc), combine_warps)  # fmt: skip
    return Reduction(partials, combine, num_chunks, chunk_positions, max(num_chunks, 1))


def position_tiles(g: Geometry, elem: int, cfg: BNConfig, cl: bool):
    """``(flat, BLOCK_HW, ALIGN, SPLIT, programs along positions)`` of an elementwise launch.

    NCHW tiles (the config spans few channels) whose ``H*W`` shares a power-of-two factor with
    the strides become image tiles (``_config.image_tiles``, which vectorise); those with odd
    ``H*W`` split tiles (``_config.split_tiles``: a vector body and scalar edges per plane,
    ``SPLIT = 1``); the others stay flat over ``N*H*W`` (``BLOCK_HW = 0``).
    """
    flat = g.s_m is not None
    block_hw, align, split = 0, 1, 0
    if not cl:
        strides = [(g.s_n, g.s_c, g.s_hw)]
        block_hw, align = image_tiles(g.hw, cfg.block_m, elem, strides)
        if block_hw == 0:
            block_hw, align = split_tiles(g.hw, cfg.block_m, elem, strides)
            split = int(block_hw > 0)
    if block_hw == 0:
        return flat, 0, 1, 0, triton.cdiv(g.n_pos, cfg.block_m)
    images_per_tile = cfg.block_m // block_hw
    row = g.hw - g.hw % align if split else g.hw  # split tiles: row blocks cover the widest body
    return False, block_hw, align, split, triton.cdiv(g.n, images_per_tile) * triton.cdiv(row, block_hw)


def reduction_tiles(g: Geometry, elem: int, cfg: BNConfig, cl: bool, num_cblocks: int, device, split: bool):
    """``(flat, BLOCK_HW, ALIGN, SPLIT, CHUNK, SEG, num_chunks, chunk_positions)`` of a
    reduction-partials launch.

    NCHW launches whose ``H*W`` gets image tiles (``_config.image_tiles`` with the reduction
    tile ``red_block_m``) loop over image tiles in chunks of an image group's row blocks
    (``_config.plan_image_chunks``: ``CHUNK`` images, ``SEG`` row blocks); with ``split`` (the
    backward sums) odd ``H*W`` likewise over split tiles (``SPLIT = 1``); the others over flat
    tiles in chunks of ``CHUNK`` positions (``_config.plan_chunks``). The statistics kernel does
    not take split tiles: a split tile's body length varies from plane to plane, which its
    per-lane Welford counts cannot follow without a division per element.
    """
    if g.n_pos > 0 and not cl:
        strides = [(g.s_n, g.s_c, g.s_hw)]
        block_hw, align = image_tiles(g.hw, cfg.red_block_m, elem, strides)
        is_split = 0
        if block_hw == 0 and split:
            block_hw, align = split_tiles(g.hw, cfg.red_block_m, elem, strides)
            is_split = int(block_hw > 0)
        if block_hw:
            row = g.hw - g.hw % align if is_split else g.hw
            images, seg, num_chunks = plan_image_chunks(g.n, row, block_hw, num_cblocks, cfg, device)
            return False, block_hw, align, is_split, images, seg, num_chunks, images * min(seg * block_hw, g.hw)
    chunk, num_chunks = plan_chunks(g.n_pos, num_cblocks, cfg, device)
    return g.s_m is not None, 0, 1, 0, chunk, 1, num_chunks, min(chunk, g.n_pos)


def slice_tiles(g: Geometry, elem: int, single_m: int):
    """``(flat, BLOCK_HW, ALIGN, SPLIT)`` of a single-pass launch, whose one tile holds the slice.

    Image tiles (``_config.image_tiles`` with rows as wide as an image) when every image fits
    one row and all ``N`` rows fit ``single_m`` (``N * next_pow2(H*W) <= single_m``; true for
    power-of-two images such as CIFAR's 2x2/4x4/8x8); for odd ``H*W`` (7x7) split tiles
    (``_config.split_tiles``) under the same condition on the body row
    (``N * next_pow2(ALIGN floor(H*W / ALIGN)) <= single_m``; the edge lanes come on top); else
    flat tiles.
    """
    strides = [(g.s_n, g.s_c, g.s_hw)]
    block_hw, align = image_tiles(g.hw, single_m, elem, strides, cap=single_m)
    if block_hw and block_hw >= g.hw and g.n * block_hw <= single_m:
        return False, block_hw, align, 0
    block_hw, align = split_tiles(g.hw, single_m, elem, strides, cap=single_m)
    if block_hw and block_hw >= g.hw - g.hw % align and g.n * block_hw <= single_m:
        return False, block_hw, align, 1
    return g.s_m is not None, 0, 1, 0
