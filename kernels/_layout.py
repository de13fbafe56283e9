"""Host-side layout helpers shared by the bounded-BN launchers and the ops' fake kernels.

Pure PyTorch (no Triton import), so ``rnip_ext.ops`` can use it for shape inference on machines
without Triton.

The kernels see a ``[N, C, *spatial]`` tensor as ``[N, C, HW]`` with strides ``(s_n, s_c, s_hw)``:
position ``m`` in ``[0, N*HW)`` of channel ``c`` lives at
``(m // HW) * s_n + c * s_c + (m % HW) * s_hw``. That needs the spatial dimensions to collapse to
one stride, which holds for contiguous (NCHW) and channels_last tensors and their channel slices.
When every tensor of a launch also has ``s_n == HW * s_hw`` (channels_last, ``N == 1``, or
``HW == 1``), positions are evenly spaced and the kernels use ``m * s_m`` without a division
(the ``FLAT`` constexpr).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

__all__ = ["View3", "spatial_stride", "view3", "alloc_like", "acc_dtype", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and statistics dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spatial_stride(t: Tensor) -> int | None:
    """The single stride of ``t``'s flattened dims ``2..``, or ``None`` if they do not collapse.

    Size-1 dims are ignored; no spatial dims, a single position or no elements give ``1``.
    """
    dims = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    if not dims or any(size == 0 for size, _ in dims):
        return 1
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_size * inner_stride:
            return None
    return dims[-1][1]


@dataclasses.dataclass(frozen=True)
class View3:
    """A tensor seen as ``[N, C, HW]``: its strides, and the even position stride if it has one."""

    s_n: int
    s_c: int
    s_hw: int
    s_m: int | None  # m * s_m addresses position m when positions are evenly spaced, else None

    def strides(self, flat: bool) -> tuple[int, int, int]:
        """``(s_n, s_c, s_hw)`` as the kernels take them; with ``flat`` the last one is ``s_m``."""
        return (self.s_n, self.s_c, self.s_m if flat else self.s_hw)  # type: ignore[return-value]


def view3(t: Tensor) -> View3:
    """Describe ``t`` (whose spatial dims must collapse, see :func:`spatial_stride`)."""
    s_hw = spatial_stride(t)
    if s_hw is None:
        raise ValueError(f"spatial dims of a tensor with strides {t.stride()} do not collapse")
    n = t.shape[0]
    hw = _numel(t.shape[2:])
    s_n = t.stride(0)
    s_c = t.stride(1)
    if hw == 1:
        s_m = s_n
    elif n == 1 or s_n == hw * s_hw:
        s_m = s_hw
    else:
        s_m = None
    return View3(s_n, s_c, s_hw, s_m)


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def alloc_like(t: Tensor) -> Tensor:
    """An uninitialised tensor like ``t`` in ``t``'s memory format, with collapsible spatial dims.

    ``torch.empty_like`` keeps the strides of a dense tensor (NCHW stays NCHW, channels_last stays
    channels_last) and makes others contiguous; the rare dense tensor whose spatial dims are
    permuted falls back to contiguous. The fake kernels call this too, so both agree on strides.
    """
    out = torch.empty_like(t)
    if spatial_stride(out) is None:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out
