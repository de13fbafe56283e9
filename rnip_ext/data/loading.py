"""Batches for the trainer from any ``torch.utils.data`` source, or from the in-memory datasets.

:func:`train_batches` wraps what :func:`rnip_ext.training.fit` is given in one object whose
``epoch(e)`` yields that epoch's ``(inputs, targets)`` on the device:

* :class:`~rnip_ext.data.InMemoryDataset`: shuffled and augmented on the device with the
  trainer's generator (:class:`~rnip_ext.distributed.ShardedDataset` under torchrun);
* a ``DataLoader``: used as built (under torchrun it must have a ``DistributedSampler``, whose
  ``set_epoch(e)`` is called each epoch);
* a map-style ``Dataset``: a ``DataLoader`` with ``batch_size``, ``num_workers`` worker
  processes (started each epoch), shuffled by a ``RandomSampler`` on the trainer's generator
  (which also seeds the workers, so a resumed run replays the same batches and augmentations), or a ``DistributedSampler`` seeded with
  ``seed`` under torchrun; the last incomplete batch is dropped, as in memory;
* an ``IterableDataset``: batched in order; under torchrun it must shard itself by rank.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from .._validation import check_int
from .dataset import InMemoryDataset

__all__ = ["eval_batches", "train_batches"]


def _to(batch, device: torch.device):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"a batch must be (inputs, targets), got {type(batch).__name__}"
                        + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _sampler(loader: DataLoader):
    batch_sampler = getattr(loader, "batch_sampler", None)
    return getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)


class _InMemoryBatches:
    def __init__(self, data, batch_size: int, generator, dist_ctx) -> None:
        from ..distributed import ShardedDataset

        self.data = data if dist_ctx is None else ShardedDataset(data, dist_ctx.rank, dist_ctx.world_size)
        self.batch_size, self.generator = batch_size, generator
        self.drop_last = len(self.data) > batch_size

    def epoch(self, epoch: int):
        return self.data.batches(self.batch_size, shuffle=True, augment=True, generator=self.generator,
                                 drop_last=self.drop_last)

    @property
    def num_batches(self) -> int:
        return self.data.num_batches(self.batch_size, drop_last=self.drop_last)


class _LoaderBatches:
    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def epoch(self, epoch: int):
        sampler = _sampler(self.loader)
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
        return (_to(b, self.device) for b in self.loader)

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch, or ``None`` when the loader cannot say (an iterable dataset)."""
        try:
            return len(self.loader)
        except TypeError:
            return None


def train_batches(data, *, batch_size: int, generator: torch.Generator, device: torch.device, dist_ctx=None,
                  num_workers: int = 0, seed: int = 0):
    """The trainer's batch source for ``data`` (see the module docstring); ``TypeError`` for anything else."""
    check_int("batch_size", batch_size, 1)
    if isinstance(data, InMemoryDataset):
        if data.images.device != device:
            raise ValueError(f"the in-memory dataset is on {data.images.device}, the model on {device}: "
                             "move one of them (InMemoryDataset.to(device))")
        return _InMemoryBatches(data, batch_size, generator, dist_ctx)
    if isinstance(data, DataLoader):
        if dist_ctx is not None and not isinstance(data.dataset, IterableDataset) and not isinstance(
                _sampler(data), DistributedSampler):
            raise ValueError("under torchrun a DataLoader needs a DistributedSampler (every rank would train on all "
                             "the data); or pass the Dataset itself and the trainer builds one")
        return _LoaderBatches(data, device)
    if isinstance(data, Dataset):
        pin = device.type == "cuda"
        # Workers start afresh every epoch, seeded from the trainer's generator (persistent workers
        # would keep their RNG across epochs, and a resumed run would augment differently).
        common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin, generator=generator)
        if isinstance(data, IterableDataset):
            return _LoaderBatches(DataLoader(data, **common), device)
        if dist_ctx is not None:
            sampler = DistributedSampler(data, num_replicas=dist_ctx.world_size, rank=dist_ctx.rank, shuffle=True,
                                         seed=seed, drop_last=True)
        else:
            sampler = RandomSampler(data, generator=generator)
        drop_last = len(data) // (dist_ctx.world_size if dist_ctx else 1) > batch_size
        return _LoaderBatches(DataLoader(data, sampler=sampler, drop_last=drop_last, **common), device)
    raise TypeError(f"cannot train on a {type(data).__name__}: give an InMemoryDataset or DataSplits, a "
                    "torch.utils.data.DataLoader, or a Dataset of (input, target) pairs")


def eval_batches(data, batch_size: int, device: torch.device, num_workers: int = 0):
    """``(inputs, targets)`` batches of ``data`` in order, on ``device`` (for evaluation)."""
    if isinstance(data, InMemoryDataset):
        return data.batches(batch_size)
    if isinstance(data, DataLoader):
        return (_to(b, device) for b in data)
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
        return (_to(b, device) for b in loader)
    raise TypeError(f"cannot evaluate on a {type(data).__name__}: give an InMemoryDataset, a DataLoader or a Dataset")
