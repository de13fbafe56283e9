"""Measurements the commands and benchmarks share: inference images/s of a model on one batch, the
kernel-launching ops of a profile, and where a number was measured (CPU model, versions).

:func:`measure_throughput` is used by ``rnip prune`` to print the speed before and after pruning next to the FLOPs, since a
FLOPs reduction is not a speed-up by itself (narrow layers use the hardware less well, and
BatchNorm, activations and memory traffic are not counted in FLOPs). For careful numbers see
``benchmarks/pruned_speed.py``.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import __version__
from .._machine import cpu_model
from .._validation import check_int
from ..pruning.graph import eval_mode

__all__ = ["NO_KERNEL_OPS", "Throughput", "cpu_model", "kernel_launching_ops", "measure_throughput", "versions"]


@dataclass
class Throughput:
    """Result of :func:`measure_throughput`.

    ``images_per_s = batch_size / median_s``, where ``median_s`` is the median wall time of
    ``timed_batches`` forward passes after ``warmup`` untimed ones, on ``device`` with ``threads``
    CPU threads (``torch.get_num_threads()``); ``times_s`` are the individual timings.
    """

    images_per_s: float
    median_s: float
    batch_size: int
    timed_batches: int
    warmup: int
    device: str
    threads: int
    times_s: list[float]

    def __str__(self) -> str:
        return f"{self.images_per_s:,.0f} images/s"


def _batch_size(example_batch) -> int:
    tensors = example_batch if isinstance(example_batch, (tuple, list)) else (example_batch,)
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("example_batch must be a tensor or a tuple of tensors")
    if tensors[0].dim() == 0 or tensors[0].shape[0] < 1:
        raise ValueError(f"example_batch must have a batch dimension of size >= 1, got shape {tuple(tensors[0].shape)}")
    return int(tensors[0].shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(model: nn.Module, example_batch, *, warmup: int = 2, repeats: int = 5) -> Throughput:
    """Inference images per second of ``model`` on ``example_batch``: ``batch / median(seconds)``.

    Runs ``warmup`` untimed forward passes, then ``repeats`` timed ones (wall clock; on CUDA with
    a synchronize before each reading), all in eval mode under ``torch.no_grad`` (each
    submodule's mode is restored afterwards). ``example_batch`` is a tensor (or tuple of tensors)
    on the model's device, its first dimension the batch. The median of a few batches is a rough
    figure: other processes on the machine, clock scaling and the first calls' allocations move
    it; compare numbers measured back to back on the same machine only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure_throughput expects an nn.Module, got {type(model).__name__}")
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        check_int(name, value, low)
    batch = _batch_size(example_batch)
    args = tuple(example_batch) if isinstance(example_batch, (tuple, list)) else (example_batch,)
    device = args[0].device
    times = []
    with eval_mode(model):
        try:
            model(*args)
        except Exception as exc:  # the model's own error type varies; the cause is the input
            raise ValueError(f"example_batch does not fit the model ({type(exc).__name__}: {exc})") from exc
        for _ in range(max(warmup - 1, 0)):
            model(*args)
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(*args)
            _sync(device)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Throughput(images_per_s=batch / median, median_s=median, batch_size=batch, timed_batches=repeats,
                      warmup=warmup, device=str(device), threads=torch.get_num_threads(), times_s=times)


# ATen ops that allocate or re-view memory without launching a kernel.
NO_KERNEL_OPS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::view", "aten::expand", "aten::as_strided", "aten::detach",
    "aten::alias", "aten::_unsafe_view", "aten::select", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::slice", "aten::unbind", "aten::t", "aten::reshape", "aten::lift_fresh",
    "aten::resize_", "aten::_reshape_alias", "aten::contiguous", "aten::to", "aten::result_type",
    "aten::narrow", "aten::split_with_sizes", "aten::split",
})  # fmt: skip


def kernel_launching_ops(events, owners: tuple[str, ...] = ("aten::",)) -> list[str]:
    """Names of the kernel-launching ATen operations among ``torch.profiler`` ``events``
    (``prof.events()``), each counted once: an op inside another whose name starts with one of
    ``owners`` (an ATen op, or e.g. ``"rnip_ext::"`` for our custom ops) is part of that one,
    and the ops in :data:`NO_KERNEL_OPS` launch nothing. On a GPU each is one kernel launch."""
    ops = []
    for event in events:
        if not event.name.startswith("aten::") or event.name in NO_KERNEL_OPS:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(owners):
            parent = parent.cpu_parent
        if parent is None:
            ops.append(event.name)
    return ops


def versions() -> dict:
    """Library, torch, Python, CUDA and Triton versions (recorded with every training run)."""
    info = {"rnip_ext": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
