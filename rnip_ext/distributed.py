"""Data-parallel training with PyTorch's own engine (``torch.distributed``, DDP, ``torchrun``).

What ``rnip train`` needs to run under ``torchrun --nproc-per-node N``: the rank layout read from
the environment torchrun sets, process-group set-up and tear-down, a sharded view of an
in-memory training set, and the averaging of per-rank epoch statistics. Nothing here moves data
by itself: every collective is a ``torch.distributed`` call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .data.augment import augment_batch, normalize
from .data.dataset import InMemoryDataset

__all__ = ["DistributedContext", "ShardedDataset", "context_from_env", "setup", "teardown", "barrier", "check_same",
           "average_stats", "restart_count"]


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def context_from_env(environ=None) -> DistributedContext | None:
    """The context torchrun describes (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``), else ``None``."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistributedContext(rank, world, local_rank)


def setup(ctx: DistributedContext, device: str = "auto") -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU) and return this rank's device.

    ``device`` is ``auto``, ``cpu`` or ``cuda``; on CUDA each rank takes the GPU ``LOCAL_RANK``.
    The rendezvous address comes from the environment (``env://``, set by torchrun). Raises
    ``RuntimeError`` when the requested device or ``torch.distributed`` is missing.
    """
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but no CUDA device is available")
        torch.cuda.set_device(ctx.local_rank)
        chosen = torch.device("cuda", ctx.local_rank)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://", rank=ctx.rank, world_size=ctx.world_size))
        # torchrun's agent keeps one store across the restarts of a job: without a namespace per
        # attempt, a restarted rank can read a dead peer's address from the previous attempt and
        # the new group fails to connect (seen with gloo). Each attempt keys its own prefix.
        store = dist.PrefixStore(f"rnip_ext/attempt_{restart_count()}", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=ctx.rank,
                                world_size=ctx.world_size)
    return chosen


def restart_count(environ=None) -> int:
    """``TORCHELASTIC_RESTART_COUNT``: how often torchrun has restarted this worker group (0 if unset)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def teardown() -> None:
    """Leave the process group (a no-op when none is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op outside a distributed job)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_same(text: str, device: torch.device, what: str) -> None:
    """Raise ``RuntimeError`` unless every rank passes the same ``text`` (one ``all_reduce`` of a
    56-bit hash: max of ``h`` and of ``-h`` both give back ``h`` only when all agree); a no-op
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    import hashlib

    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != h or -int(t[1]) != h:
        raise RuntimeError(f"ranks disagree on {what}: every rank must remove the same channels")


def average_stats(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (one ``all_reduce``); the values themselves without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class ShardedDataset:
    """One rank's share of an :class:`~rnip_ext.data.InMemoryDataset`, for data-parallel training.

    Every rank holds the whole dataset and the same generator state. Each epoch all ranks draw the
    same shuffled order, drop its last ``len % world_size`` samples so that shares are equal, and
    walk it in global batches of ``world_size * batch_size``: rank ``r`` takes the ``r``-th
    contiguous chunk of each. Augmentation offsets are drawn for the whole global batch, so the
    generators stay in step across ranks and, with ``N`` ranks of ``batch_size`` each, the epoch
    sees exactly the batches a single process with ``N * batch_size`` would.

    It offers what :func:`rnip_ext.training.train_epoch` uses: ``images`` (for the device),
    ``len()`` (this rank's samples), :meth:`num_batches` and :meth:`batches`.
    """

    def __init__(self, data: InMemoryDataset, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.data = data
        self.rank = rank
        self.world_size = world_size

    @property
    def images(self) -> Tensor:
        return self.data.images

    def __len__(self) -> int:
        return len(self.data) // self.world_size

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's ``(x, y)`` batches of ``batch_size`` (the last one smaller unless ``drop_last``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        data, world = self.data, self.world_size
        n = len(data)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order[: len(self) * world].to(data.images.device)
        per_rank = len(self) - len(self) % batch_size if drop_last else len(self)
        step = batch_size * world
        for start in range(0, per_rank * world, step):
            idx = order[start : start + step]
            images = data.images[idx]
            if augment:
                images = augment_batch(images, padding=4 if data.augment_flips else 2, flip=data.augment_flips,
                                       generator=generator)
            share = idx.shape[0] // world
            mine = slice(self.rank * share, (self.rank + 1) * share)
            yield normalize(images[mine], data.mean, data.std), data.labels[idx[mine]]
