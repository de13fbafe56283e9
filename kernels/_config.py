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

The reductions (batch statistics, backward sums) are split over (chunk of positions, channel
block) so that even a layer with few channels and large images, e.g. ``8x16x256x256``, runs on
hundreds of programs rather than one per channel; the chunk partials are merged by a combine
kernel in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = ["BNConfig", "bn_config", "plan_chunks", "target_programs"]


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
    """

    block_c: int
    block_m: int
    red_block_m: int
    chunk_tiles: int = 0
    comb_block_c: int = 64
    comb_block_k: int = 32
    num_warps: int = 4

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
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


def target_programs(device: torch.device) -> int:
    """How many reduction programs to aim for: a few waves on a GPU, a handful elsewhere.

    Under the CPU interpreter programs run one after another, so more of them only adds Python
    overhead; a handful still exercises the chunk combine.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(index)
    return 4


def plan_chunks(
    n_pos: int, num_cblocks: int, config: BNConfig, device: torch.device
) -> tuple[int, int]:
    """Split ``n_pos`` positions into chunks for the reductions: ``(chunk_positions, num_chunks)``.

    A chunk is a whole number of reduction tiles. Unless ``config.chunk_tiles`` fixes it, the
    chunk is sized so that ``num_chunks * num_cblocks`` reaches :func:`target_programs` while
    every program still loops over at least 4 tiles when there is enough work (a program that
    loads a single tile spends as long launching as loading). ``n_pos == 0`` gives no chunks.
    """
    block_m = config.red_block_m
    if n_pos <= 0:
        return block_m, 0
    tiles = -(-n_pos // block_m)
    if config.chunk_tiles:
        tiles_per_chunk = config.chunk_tiles
    else:
        want_chunks = max(1, -(-target_programs(device) // max(num_cblocks, 1)))
        tiles_per_chunk = max(-(-tiles // want_chunks), min(4, tiles))
    chunk = tiles_per_chunk * block_m
    return chunk, -(-n_pos // chunk)
