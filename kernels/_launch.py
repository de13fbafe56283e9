"""Launch plumbing shared by the launchers: runtime sizes, dtypes, devices, the running-stats mode.

The launchers call ``kernel.run(*pointers, *sizes, <scalars>, *consts, <flags>, grid=,
warmup=False, num_warps=)``, what ``kernel[grid](...)`` forwards to, without building its proxy
per launch, and spell each reduction's two launches (partials when there are chunks, then the
combine; ``_plan.Reduction``) out in place rather than through a shared helper: host time.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._layout import acc_dtype

__all__ = ["RUNNING_COUNT", "RUNNING_CUMULATIVE", "RUNNING_MOMENTUM", "RUNTIME_SIZES", "device_guard",
           "ensure_launchable", "running_mode", "tl_dtype"]  # fmt: skip

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}

# Kernel arguments that change with the batch or image size (positions, chunking, the batch
# stride): every kernel lists them in ``do_not_specialize``, so Triton does not compile a variant
# per value class (== 1, divisible by 16) and a new batch or image size reuses the compiled
# kernels. Constexprs are tile shapes and flags only.
RUNTIME_SIZES = ["HW", "n_pos", "K", "CHUNK", "SEG", "s_n"]

# The running-statistics update of a training forward (the kernels' RUNNING constexpr; used only
# with a running_mean pointer): f = momentum, with num_batches_tracked incremented by the launch
# (RUNNING_COUNT) or not at all (RUNNING_MOMENTUM); or f = 1 / num_batches_tracked
# (RUNNING_CUMULATIVE, momentum=None), the count incremented just before the launch because every
# program reads it.
RUNNING_MOMENTUM, RUNNING_COUNT, RUNNING_CUMULATIVE = 0, 1, 2


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


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: Tensor):
    """Make ``t``'s GPU the current device for the launch (Triton launches on the current one);
    nothing to do (no context switch per launch) when it already is."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


def running_mode(running, momentum: float | None, num_batches_tracked: Tensor | None, n_pos: int):
    """``(running_mean, running_var, num_batches_tracked, RUNNING)`` pointers and mode of a
    training forward's bookkeeping, done on device (``None`` pointers: no update).

    ``num_batches_tracked`` (when given) is incremented once per call: by the kernel
    (``RUNNING_COUNT``: one program stores ``n + 1``), or here, as one in-place add before the
    launch, when the kernels read the new count (``momentum=None``) or do not update (no running
    buffers, an empty batch: counted, no statistics moved, as ``nn.BatchNorm2d``).
    """
    if running is None or n_pos == 0:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return None, None, None, RUNNING_MOMENTUM
    if momentum is None:
        num_batches_tracked.add_(1)
        return running[0], running[1], num_batches_tracked, RUNNING_CUMULATIVE
    if num_batches_tracked is None:
        return running[0], running[1], None, RUNNING_MOMENTUM
    return running[0], running[1], num_batches_tracked, RUNNING_COUNT
