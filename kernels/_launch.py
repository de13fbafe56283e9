"""Launch plumbing shared by the bounded-BN launchers: device checks, dtypes, layouts, configs."""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._config import BNConfig, bn_config
from ._layout import View3, acc_dtype, spatial_stride, view3

__all__ = [
    "acc_dtype",
    "check_positions",
    "device_guard",
    "ensure_launchable",
    "kernel_ready",
    "layout_config",
    "tl_dtype",
    "vector",
    "view3",
]

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


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
    lead = views[0]
    positions_contiguous = lead.s_m == 1 or (lead.s_m is None and lead.s_hw == 1)
    channels_contiguous = lead.s_c == 1 and num_channels > 1 and not positions_contiguous
    if config is None:
        config = bn_config(num_channels, channels_contiguous)
    return flat, config


def vector(t: Tensor | None) -> Tensor | None:
    """A per-channel ``[C]`` tensor with unit stride, as the kernels index it (``None`` stays).

    A no-op for parameters and buffers; copies ``C`` values for views such as the stride-0
    gradient that ``penalty.sum()`` sends back.
    """
    return None if t is None else t.contiguous()
