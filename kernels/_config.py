"""Block sizes, warps and chunking for the bounded-BN kernels: the one place they are chosen.

Every launcher asks :func:`bn_config` for a :class:`BNConfig` (or takes one from its caller, which
is how the tests force tiny blocks and many chunks, and how a benchmark can sweep configurations)
and :func:`plan_chunks` for the split of the ``N*H*W`` positions into chunks. Nothing here imports
Triton, so the choice can be inspected and unit-tested anywhere.

The choice depends on the layout, because a tile is ``[BLOCK_C channels x BLOCK_M positions]``:

* positions contiguous (NCHW): few channels per tile, long runs of positions, so that each
  channel's row of the tile is one (or a few, when ``H*W`` is small) coalesced run;
* channels contiguous (channels_last, or ``H*W == 1``): many channels per tile, fewer positions,
  so that each position's column is one coalesced run of channels.

NCHW elementwise tiles (normalise, the chunked forward's normalise-with-combine, dx), the
single-pass tiles and the reduction partials' tiles are 2-D over positions: images x
``BLOCK_HW`` positions of ``H*W`` (:func:`image_tiles`), so that a row is one aligned contiguous
run the compiler can load as vectors even when ``H*W`` is not a multiple of 16 (14x14, 2x2); a
flat tile over ``N*H*W`` has a tail mask that forces scalar loads. Odd ``H*W`` (7x7, 5x5), whose
planes start on every residue modulo the vector width, takes split tiles in the elementwise and
single-pass kernels and the backward partials (:func:`split_tiles`: each plane's aligned body as
vectors, its head and tail one element at a time); the statistics partials keep flat tiles there.

The reductions (batch statistics, backward sums) are split over (chunk, channel block) so that
even a layer with few channels and large images runs on hundreds of programs rather than one per
channel: flat tiles in chunks of positions (:func:`plan_chunks`), image tiles in chunks of an
image group's row blocks (:func:`plan_image_chunks`: ``8x16x256x256`` gets 512 programs, not 8).
A chunk holds at least :data:`MIN_CHUNK_POSITIONS` positions, so its partials (written and read
once, by the combine kernel: 4 values per channel and chunk) stay within ~3% of the input's
elements. The partials are merged by a combine kernel in a fixed order (deterministic, no
atomics).

Two paths for a training step (:func:`single_pass_config` decides, see its docstring for the rule):

* **single-pass**: one program owns a block of channels and its whole ``N*H*W`` slice, held in
  registers: the forward reads ``x`` once and writes ``y`` (2S of traffic, one launch), the
  backward reads ``x`` and ``dy`` once and writes ``dx`` (3S, one launch);
* **chunked**: statistics partials + combine + normalise (3S forward, 3 launches) and backward
  partials + combine + dx (5S, 3 launches), for slices too large to hold on chip.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = [
    "BNConfig",
    "bn_config",
    "image_tiles",
    "plan_chunks",
    "plan_image_chunks",
    "MIN_CHUNK_POSITIONS",
    "split_tiles",
    "single_pass_config",
    "sm_count",
    "target_programs",
]


@dataclasses.dataclass(frozen=True)
class BNConfig:
    """Tile shapes for one bounded-BN call (all powers of two).

    Attributes:
        block_c: channels per tile of the elementwise and the position-reduction kernels.
        block_m: positions per tile of the elementwise kernels (normalise, dx).
        red_block_m: positions per tile of the reduction kernels (statistics, backward sums).
        chunk_tiles: reduction tiles per chunk (``0``: let :func:`plan_chunks` decide).
        comb_block_c: channels per program of the combine kernels.
        comb_block_k: chunk partials merged per step of the combine kernels.
        num_warps: warps per program of the elementwise and reduction kernels.
        single_m: ``0`` for the chunked path; else the single-pass path, whose programs hold
            ``block_c`` channels x ``single_m`` positions on chip (``single_m >= N*H*W``).
    """

    block_c: int
    block_m: int
    red_block_m: int
    chunk_tiles: int = 0
    comb_block_c: int = 64
    comb_block_k: int = 32
    num_warps: int = 4
    single_m: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("chunk_tiles", "single_m") and value == 0:
                continue
            if field.name == "chunk_tiles":
                if value < 0:
                    raise ValueError(f"BNConfig.chunk_tiles must be >= 0, got {value}")
                continue
            if value < 1 or value & (value - 1):
                raise ValueError(f"BNConfig.{field.name} must be a power of two, got {value}")


def _pow2_at_most(n: int, cap: int) -> int:
    """The smallest power of two >= ``n``, capped at ``cap`` (and at least 1)."""
    p = 1
    while p < n and p < cap:
        p *= 2
    return p


# Elements per tile: ~4096 keeps 32 fp32 values per thread at 4 warps, enough loads in flight to
# saturate HBM without spilling; the reductions use half (two tensors are live in the backward).
_TILE = 4096
_RED_TILE = 2048


def bn_config(num_channels: int, channels_contiguous: bool) -> BNConfig:
    """The default tiles for ``num_channels`` channels in the given layout."""
    if channels_contiguous:
        block_c = _pow2_at_most(num_channels, 128)
        block_m = max(_TILE // block_c, 16)
        red_block_m = max(_RED_TILE // block_c, 16)
    else:
        block_c = _pow2_at_most(num_channels, 4)
        block_m = _TILE // block_c
        red_block_m = _RED_TILE // block_c
    return BNConfig(
        block_c=block_c,
        block_m=block_m,
        red_block_m=red_block_m,
        comb_block_c=_pow2_at_most(num_channels, 128),
        comb_block_k=32,
        num_warps=8 if block_c * block_m >= 4096 else 4,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# SMs assumed for ``meta`` tensors, on which launches are only planned (benchmarks/aot_sm90.py,
# the gpu_check dry run): an H200's (an H100 SXM has as many).
PLANNING_SM_COUNT = 132


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``'s GPU (:data:`PLANNING_SM_COUNT` for ``meta``);
    0 for a device without any (CPU: the interpreter runs programs one after another)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return PLANNING_SM_COUNT if device.type == "meta" else 0


def target_programs(device: torch.device) -> int:
    """How many reduction programs to aim for: a few waves on a GPU, a handful elsewhere.

    Under the CPU interpreter programs run one after another, so more of them only adds Python
    overhead; a handful still exercises the chunk combine.
    """
    sms = sm_count(device)
    return 4 * sms if sms else 4


# Positions per reduction chunk, at least: each chunk writes 2 partials per channel that the
# combine reads back (4 values per chunk and channel), i.e. <= 4 / 128 = 3.1% of the input.
MIN_CHUNK_POSITIONS = 128


def _tiles_per_chunk(tiles: int, tile_positions: int, num_cblocks: int, config: BNConfig,
                     device: torch.device) -> int:  # fmt: skip
    """Tiles per chunk: ``config.chunk_tiles``, else enough chunks for :func:`target_programs`
    with at least 4 tiles and :data:`MIN_CHUNK_POSITIONS` positions each (as far as there is
    work)."""
    if config.chunk_tiles:
        return config.chunk_tiles
    want_chunks = max(1, -(-target_programs(device) // max(num_cblocks, 1)))
    least = max(4, -(-MIN_CHUNK_POSITIONS // max(tile_positions, 1)))
    return max(-(-tiles // want_chunks), min(least, tiles))


def plan_chunks(
    n_pos: int, num_cblocks: int, config: BNConfig, device: torch.device
) -> tuple[int, int]:
    """Split ``n_pos`` positions into chunks of flat tiles for the reductions:
    ``(chunk_positions, num_chunks)``.

    A chunk is a whole number of ``red_block_m``-position tiles (:func:`_tiles_per_chunk`).
    ``n_pos == 0`` gives no chunks.
    """
    block_m = config.red_block_m
    if n_pos <= 0:
        return block_m, 0
    tiles = -(-n_pos // block_m)
    chunk = _tiles_per_chunk(tiles, block_m, num_cblocks, config, device) * block_m
    return chunk, -(-n_pos // chunk)


def plan_image_chunks(
    num_images: int, hw: int, block_hw: int, num_cblocks: int, config: BNConfig,
    device: torch.device,
) -> tuple[int, int, int]:  # fmt: skip
    """Chunks of image tiles for the NCHW reduction kernels: ``(images_per_chunk, segment_rows,
    num_chunks)``.

    A reduction tile is ``red_block_m // block_hw`` images (a group) x ``block_hw`` positions,
    and a group's images take ``row_blocks = cdiv(H*W, block_hw)`` row blocks. With ``t`` tiles
    per chunk (:func:`_tiles_per_chunk`): when ``t >= row_blocks`` a chunk is
    ``cdiv(t, row_blocks)`` whole groups (``segment_rows = row_blocks``); otherwise a chunk is one
    group's run of ``segment_rows = t`` row blocks, so that a few large images still spread over
    hundreds of programs. Chunk ``k`` covers segment ``k mod S`` (``S = cdiv(row_blocks,
    segment_rows)``) of groups ``[k div S * G, ...)``, ``G`` groups per chunk.
    """
    images_per_tile = max(config.red_block_m // block_hw, 1)
    if num_images <= 0 or hw <= 0:
        return images_per_tile, 1, 0
    row_blocks = -(-hw // block_hw)
    groups = -(-num_images // images_per_tile)
    per_chunk = _tiles_per_chunk(groups * row_blocks, config.red_block_m, num_cblocks, config, device)
    if per_chunk >= row_blocks:
        groups_per_chunk = -(-per_chunk // row_blocks)
        return groups_per_chunk * images_per_tile, row_blocks, -(-groups // groups_per_chunk)
    segments = -(-row_blocks // per_chunk)
    return images_per_tile, per_chunk, groups * segments


# Single-pass budget: elements of one tensor a program holds on chip. The backward holds two
# (x and dy), so at 16 warps (512 threads, at most 128 registers each so that one program fits an
# SM's 64K-register file) that is 2 x 16 fp32 values per thread plus their addresses: no spills
# on sm_90 (benchmarks/aot_sm90.py compiles every configuration chosen for the CIFAR VGG-16 and
# ResNet-50 layers: at most 104 registers, no spills; tests/kernels/test_aot_sm90.py a subset).
SINGLE_MAX_ELEMS = 8192
_SINGLE_ELEMS_PER_THREAD = 16
# Slices up to this many positions always take the single-pass path (deep CIFAR layers at
# batch 128: 512x4x4 and 512x2x2), however few channel blocks that leaves -- in channels_last
# only where a channel block fills a 32-byte sector (see single_pass_config).
SINGLE_ALWAYS_POSITIONS = 2048
# Larger slices take it only with enough programs to spread over the GPU's SMs.
_SINGLE_MIN_PROGRAMS = 16
# Bytes of one memory sector: a program's run of contiguous elements should fill one.
_SECTOR_BYTES = 32


# Image tiles (NCHW elementwise kernels): a row covers at most this many positions of H*W.
HW_TILE_CAP = 128
# Widest global load/store: 16 bytes (ld.global.v4.b32, v8 of 16-bit values).
VECTOR_BYTES = 16


def image_tiles(hw: int, block_m: int, elem_size: int, strides: list[tuple[int, int, int]],
                cap: int = HW_TILE_CAP):  # fmt: skip
    """``(BLOCK_HW, ALIGN)`` for the NCHW elementwise kernels, or ``(0, 1)`` for flat tiles.

    Rule (pure Python, no GPU needed): when every tensor of the launch has unit ``H*W`` stride
    and ``H*W > 1`` (``strides`` are each tensor's ``(s_n, s_c, s_hw)``), a tile is
    ``block_m // BLOCK_HW`` images x ``BLOCK_HW`` positions of one image, with

    * ``BLOCK_HW = min(next_pow2(H*W), cap, block_m)`` (``cap = HW_TILE_CAP = 128``): one row
      per image for small images (2x2 -> 4, 8x8 -> 64), 128-position rows (512 bytes in fp32)
      for larger ones (14x14: two row blocks, the second 68 positions long);
    * ``ALIGN``: the largest power of two dividing ``H*W`` and every ``s_n`` and ``s_c``, capped
      at the vector width ``16 / elem_size``. Rows then start on ``ALIGN``-element boundaries and
      the kernels load them ``ALIGN`` elements at a time (14x14 fp32: 4, i.e. ``v4``). A flat
      tile over ``N*H*W`` instead has a mask ``m < N*H*W`` the compiler cannot split into
      vectors, so flat tiles load NCHW data one element at a time for every image size.

    ``ALIGN = 1`` (odd ``H*W``, e.g. 7x7 or 57x57) gives ``(0, 1)``: an odd-length row cannot
    start on a vector boundary in every image; :func:`split_tiles` handles those.

    Compiled variants: one per ``(BLOCK_HW, ALIGN)`` class, i.e. per power of two of ``H*W``
    up to 128 and per power-of-two factor (2, 4, 8) of ``H*W`` up to the vector width; every
    image with ``H*W > 64`` and the same factor shares one. The reduction partials take the same
    rule with their tile ``red_block_m``.
    """
    if hw <= 1 or any(s_hw != 1 for _, _, s_hw in strides):
        return 0, 1
    block_hw = min(_pow2_at_most(hw, cap), block_m)
    align = 1
    vec = max(VECTOR_BYTES // elem_size, 1)
    values = [hw] + [s for s_n, s_c, _ in strides for s in (s_n, s_c)]
    while align < vec and all(v % (2 * align) == 0 for v in values):
        align *= 2
    return (block_hw, align) if align > 1 else (0, 1)


# Split tiles (odd H*W): a plane must hold at least this many vectors to be split into an
# aligned body and scalar edges; smaller planes would spend most lanes on the edges.
SPLIT_MIN_VECTORS = 4


def split_tiles(hw: int, block_m: int, elem_size: int, strides: list[tuple[int, int, int]],
                cap: int = HW_TILE_CAP):  # fmt: skip
    """``(BLOCK_HW, ALIGN)`` of NCHW split tiles, or ``(0, 1)``: for ``H*W`` that
    :func:`image_tiles` leaves flat (odd ``H*W`` such as 7x7, 5x5, 57x57).

    An odd-length plane ``(n, c)`` starts at ``o = n*s_n + c*s_c``, which lands on a different
    residue modulo the vector width in every plane, so no row of a 2-D tile can start on a vector
    boundary in all of them. A split tile cuts each plane at the vector boundaries instead::

        head = (-o) mod ALIGN           (positions [0, head): scalar)
        body = ALIGN * floor((H*W - head) / ALIGN)
                                        (positions [head, head + body): starts at an address
                                         divisible by ALIGN, vector loads/stores)
        tail = H*W - head - body < ALIGN  (scalar)

    The kernels hold the body as ``[BLOCK_C, images, BLOCK_HW]`` (the row limit ``body`` is then
    constant along the vector axis, which the compiler needs to keep masked vectors) and the
    head and tail as ``[BLOCK_C, images, 2 * ALIGN]`` lanes (at most ``2 (ALIGN - 1)`` used).
    Rule (pure Python, no GPU needed):

    * unit ``H*W`` stride in every tensor, and every tensor's ``(s_n, s_c)`` congruent modulo
      ``ALIGN`` (so one split serves all of them: a dense NCHW ``y``/``dx`` like ``x``);
    * ``ALIGN = 16 / elem_size`` (the vector width: 4 fp32, 8 fp16/bf16, 2 fp64);
    * ``H*W >= SPLIT_MIN_VECTORS * ALIGN`` (16 fp32, 32 fp16/bf16 positions): at least half of
      each plane in the body, about 90% at 7x7 (fp32: 44 or 48 of 49);
    * ``BLOCK_HW = min(next_pow2(ALIGN * floor(H*W / ALIGN)), cap, block_m)`` (7x7: 64).

    Only when :func:`image_tiles` gives flat tiles; its aligned rows need no edges.
    """
    vec = max(VECTOR_BYTES // elem_size, 1)
    if hw <= 1 or vec < 2 or any(s_hw != 1 for _, _, s_hw in strides):
        return 0, 1
    if image_tiles(hw, block_m, elem_size, strides, cap)[0]:
        return 0, 1
    residues = {(s_n % vec, s_c % vec) for s_n, s_c, _ in strides}
    if len(residues) != 1 or hw < SPLIT_MIN_VECTORS * vec:
        return 0, 1
    return min(_pow2_at_most(hw - hw % vec, cap), block_m), vec


def single_pass_config(
    n_pos: int, num_channels: int, hw: int, channels_contiguous: bool, elem_size: int
) -> BNConfig | None:
    """The single-pass tiles for a training step, or ``None`` for the chunked path.

    Rule (pure Python, no GPU needed):

    * ``single_m = next_pow2(max(n_pos, 16))`` positions per program, on chip;
    * eligible when ``single_m <= SINGLE_MAX_ELEMS`` (8192), i.e. ``N*H*W <= 8192``;
    * ``block_c`` channels per program: enough that a program's contiguous run of memory fills
      a 32-byte sector (``32 / (run * elem_size)``, ``run = 1`` for channels_last and ``H*W``
      for NCHW), capped by the budget ``block_c * single_m <= SINGLE_MAX_ELEMS`` and by ``C``;
    * channels_last: only when that run does fill a sector (``block_c * elem_size >= 32``, or
      ``block_c = C``): a narrower channel block reads each position's few channels as scalar,
      uncoalesced loads (benchmarks/aot_sm90.py: 0 vector loads), so such slices (e.g.
      ``128x256x8x8``, ``128x512x4x4``) take the chunked path, whose channels_last tiles are 128
      channels wide;
    * otherwise taken when ``N*H*W <= 2048`` (always), or when the layer still gives at least 16
      programs (``cdiv(C, block_c) >= 16``); a few channels over a large slice would otherwise run
      on a handful of SMs;
    * ``num_warps = clamp(block_c * single_m / 512, 1, 16)``: 16 values of each tensor per
      thread.

    The tile width is a power of two, so a smaller last batch reuses the compiled kernel unless
    its slice crosses a power of two. ``n_pos == 0`` takes the chunked path (nothing to hold).
    """
    if n_pos <= 0 or num_channels <= 0:
        return None
    single_m = _pow2_at_most(max(n_pos, 16), 1 << 40)
    if single_m > SINGLE_MAX_ELEMS:
        return None
    run = 1 if channels_contiguous else max(hw, 1)
    want_c = _pow2_at_most(-(-_SECTOR_BYTES // (run * elem_size)), 1 << 20)
    block_c = min(want_c, SINGLE_MAX_ELEMS // single_m, _pow2_at_most(num_channels, 64))
    if channels_contiguous and block_c * elem_size < _SECTOR_BYTES and block_c < num_channels:
        return None
    programs = -(-num_channels // block_c)
    if n_pos > SINGLE_ALWAYS_POSITIONS and programs < _SINGLE_MIN_PROGRAMS:
        return None
    elems = block_c * single_m
    num_warps = max(1, min(16, elems // (32 * _SINGLE_ELEMS_PER_THREAD)))
    return BNConfig(
        block_c=block_c,
        block_m=single_m,
        red_block_m=single_m,
        num_warps=_pow2_at_most(num_warps, 16),
        single_m=single_m,
    )
