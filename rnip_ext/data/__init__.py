"""Datasets kept whole in memory as uint8 tensors, with batch augmentation on the device.

``load_dataset("cifar10" | "cifar100" | "digits", data_dir)`` returns train/val/test splits; the
validation split is carved from the training set with a fixed seed (model selection never sees
the test set).
"""

from .augment import augment_batch, normalize
from .cifar import CIFAR_FILES, download_cifar, load_cifar
from .dataset import DATASETS, DataSplits, InMemoryDataset, load_dataset
from .digits import load_digits

__all__ = [
    "CIFAR_FILES",
    "DATASETS",
    "DataSplits",
    "InMemoryDataset",
    "augment_batch",
    "download_cifar",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "normalize",
]
