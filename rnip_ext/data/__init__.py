"""Training data: datasets kept whole in memory as uint8 tensors (augmented on the device), image
folders streamed from disk, and the batches the trainer draws from any ``torch.utils.data`` source.

``load_dataset("cifar10" | "cifar100" | "digits", data_dir)`` and ``load_image_folder(dir,
image_size)`` return train/val/test splits; a validation split carved from the training set uses
a fixed seed (model selection never sees the test set).
"""

from .augment import augment_batch, normalize
from .cifar import CIFAR_FILES, download_cifar, load_cifar
from .dataset import DATASETS, DataSplits, InMemoryDataset, load_dataset
from .digits import load_digits
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, load_image_folder

__all__ = [
    "CIFAR_FILES",
    "DATASETS",
    "DataSplits",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "InMemoryDataset",
    "augment_batch",
    "download_cifar",
    "load_cifar",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "normalize",
]
