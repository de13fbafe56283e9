"""In-memory datasets and the train/validation/test splits the CLI trains on."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .augment import augment_batch, normalize
from .cifar import download_cifar, load_cifar
from .digits import load_digits

__all__ = ["DATASETS", "DataSplits", "InMemoryDataset", "load_dataset"]

# name -> (classes, channel mean, channel std, image size, augment with crops/flips)
DATASETS = {
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 32, True),
    "cifar100": (100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 32, True),
    # Digits: flips would turn some digits into others; small crops only.
    "digits": (10, (0.3053,), (0.3186,), 16, False),
}


class InMemoryDataset:
    """A whole dataset as one uint8 image tensor plus labels, on one device.

    :meth:`batches` yields normalised float batches, augmented on the device when asked, so
    loading never waits on worker processes or host-to-device copies.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean, std, augment_flips: bool = True) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device)
        self.augment_flips = augment_flips

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "InMemoryDataset":
        """A copy on ``device``."""
        return InMemoryDataset(self.images.to(device), self.labels.to(device), self.mean.tolist(),
                               self.std.tolist(), self.augment_flips)

    def subset(self, index: Tensor) -> "InMemoryDataset":
        return InMemoryDataset(self.images[index], self.labels[index], self.mean.tolist(), self.std.tolist(),
                               self.augment_flips)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches: float32 normalised images and int64 labels, on the dataset's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.images.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            images = self.images[idx]
            if augment:
                images = augment_batch(images, padding=4 if self.augment_flips else 2,
                                       flip=self.augment_flips, generator=generator)
            yield normalize(images, self.mean, self.std), self.labels[idx]


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset, and what a model needs to know of it.

    The splits are :class:`InMemoryDataset` objects or any ``torch.utils.data.Dataset`` (an image
    folder streamed from disk); ``test`` may be ``None`` (no test set)."""

    train: InMemoryDataset
    val: InMemoryDataset
    test: InMemoryDataset | None
    num_classes: int
    in_channels: int
    image_size: int


def _split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * fraction)) if fraction > 0 else 0
    return order[n_val:].sort().values, order[:n_val].sort().values


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, val_fraction: float = 0.1, seed: int = 0,
                 device="cpu", download: bool = False, image_size: int | None = None) -> DataSplits:
    """Load ``name`` (``cifar10``, ``cifar100`` or ``digits``) whole into memory on ``device``.

    CIFAR: the training files are split into train and a held-out validation set of
    ``val_fraction`` (seeded); the test files form the test set. Digits (the embedded default,
    no files needed): a seeded 60/20/20 split of the 1,797 images, upsampled to ``image_size``
    (default 16; 32 suits the CIFAR networks).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    classes, mean, std, size, flips = DATASETS[name]
    if name == "digits":
        size = image_size or size
        images, labels = load_digits(size)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_test = n_val = len(labels) // 5
        parts = order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
        full = InMemoryDataset(images, labels, mean, std, flips)
        train, val, test = (full.subset(p.sort().values) for p in parts)
    else:
        if data_dir is None:
            raise ValueError(f"{name} needs a data directory (--data-dir)")
        if download:
            download_cifar(data_dir, name)
        images, labels = load_cifar(data_dir, name, train=True)
        test_images, test_labels = load_cifar(data_dir, name, train=False)
        full = InMemoryDataset(images, labels, mean, std, flips)
        train_idx, val_idx = _split(len(labels), val_fraction, seed)
        train, val = full.subset(train_idx), full.subset(val_idx)
        test = InMemoryDataset(test_images, test_labels, mean, std, flips)
    return DataSplits(train.to(device), val.to(device), test.to(device), classes, images.shape[1], size)
