"""Host-side layout helpers shared by the launch planner and the ops' fake kernels.

Pure PyTorch (no Triton import), so ``rnip_ext.ops`` can use it for shape inference on machines
without Triton.

The kernels see a ``[N, C, *spatial]`` tensor as ``[N, C, HW]`` with strides ``(s_n, s_c, s_hw)``:
position ``m`` in ``[0, N*HW)`` of channel ``c`` lives at
``(m // HW) * s_n + c * s_c + (m % HW) * s_hw``. Every ``[N, C, *]`` tensor of one launch (``x``,
``y``, ``dy``, ``dx``) shares these strides: the kernels compute each tile's offsets once and read
and write all of them with it. The launchers therefore take ``x`` as it is when it is dense with
collapsible spatial dims (:func:`dense_layout`: NCHW, channels_last and any dense permutation
keeping ``H, W`` in order) and copy it to NCHW otherwise (a channel slice, permuted spatial dims:
never the hot path); outputs are allocated like ``x`` (:func:`alloc_like`), and a ``dy`` in another
layout is copied into ``x``'s. When positions are also evenly spaced (``s_n == HW * s_hw``:
channels_last, ``N == 1`` or ``HW == 1``) the kernels address position ``m`` as ``m * s_m``
without a division (the ``FLAT`` constexpr).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["FLOAT_DTYPES", "Geometry", "acc_dtype", "alloc_like", "dense_layout", "dense_strides", "empty_as", "geometry",
           "in_layout_of", "kernel_ready", "spatial_stride"]  # fmt: skip

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and statistics dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spatial_stride(shape, strides) -> int | None:
    dims = [(size, stride) for size, stride in zip(shape[2:], strides[2:]) if size != 1]
    if not dims or any(size == 0 for size, _ in dims):
        return 1
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_size * inner_stride:
            return None
    return dims[-1][1]


def spatial_stride(t: Tensor) -> int | None:
    """The single stride of ``t``'s flattened dims ``2..``, or ``None`` if they do not collapse.

    Size-1 dims are ignored; no spatial dims, a single position or no elements give ``1``.
    """
    return _spatial_stride(t.shape, t.stride())


def _dense(shape, strides) -> bool:
    """Non-overlapping and dense: the size > 1 dims, by increasing stride, tile memory exactly."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def dense_strides(shape, strides) -> bool:
    """Whether the kernels read a tensor of these sizes and strides in place: dense, with spatial
    dims that collapse to one stride (no elements: trivially)."""
    numel = 1
    for size in shape:
        numel *= size
    return numel == 0 or (_dense(shape, strides) and _spatial_stride(shape, strides) is not None)


def dense_layout(t: Tensor) -> bool:
    """:func:`dense_strides` of ``t``."""
    return dense_strides(t.shape, t.stride())


def kernel_ready(t: Tensor) -> Tensor:
    """``t`` itself when :func:`dense_layout`, else an NCHW copy (never the hot path)."""
    return t if dense_layout(t) else t.contiguous()


def alloc_like(t: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``t`` with the strides the kernels use for it: ``t``'s
    own when :func:`dense_layout` (``empty_like`` keeps them), else NCHW. The fake kernels call
    this too, so both agree on strides."""
    if dense_layout(t):
        return torch.empty_like(t)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def empty_as(t: Tensor) -> Tensor:
    """An uninitialised tensor with ``t``'s shape, strides, dtype and device (``t`` dense): what
    ``empty_like`` gives, without its Python-side layout inference on ``meta`` tensors."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


def in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (shaped like ``like``) with ``like``'s strides: itself when they already agree on every
    dim of size > 1, else a copy (a ``dy`` in another layout than ``x``, or the stride-0 gradient
    of ``y.sum()``)."""
    if t.stride() == like.stride() or all(
        a == b for a, b, size in zip(t.stride(), like.stride(), like.shape) if size != 1
    ):
        return t
    return empty_as(like).copy_(t)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A dense ``[N, C, *]`` tensor seen as ``[N, C, HW]``: sizes, strides and, when positions are
    evenly spaced, their spacing ``s_m`` (else ``None``)."""

    n: int
    c: int
    hw: int
    s_n: int
    s_c: int
    s_hw: int
    s_m: int | None

    @property
    def n_pos(self) -> int:
        return self.n * self.hw

    def strides(self, flat: bool) -> tuple[int, int, int]:
        """``(s_n, s_c, s_hw)`` as the kernels take them; with ``flat`` the last one is ``s_m``."""
        return (self.s_n, self.s_c, self.s_m if flat else self.s_hw)  # type: ignore[return-value]


def geometry(shape, strides) -> Geometry:
    """The :class:`Geometry` of a tensor with these sizes and strides (spatial dims collapsible)."""
    s_hw = _spatial_stride(shape, strides)
    if s_hw is None:
        raise ValueError(f"spatial dims of a tensor with strides {tuple(strides)} do not collapse")
    n, c = shape[0], shape[1]
    hw = 1
    for size in shape[2:]:
        hw *= size
    s_n, s_c = strides[0], strides[1]
    if hw == 1:
        s_m = s_n
    elif n == 1 or s_n == hw * s_hw:
        s_m = s_hw
    else:
        s_m = None
    return Geometry(n, c, hw, s_n, s_c, s_hw, s_m)
