"""CIFAR-10/100 from the standard python-pickle distributions, without torchvision.

Expected layout under ``data_dir`` (what the official ``*-python.tar.gz`` archives unpack to)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
    cifar-100-python/train, test

Each file is a pickled dict with ``b"data"`` (uint8, ``N x 3072``, channel-major 32x32 images) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The pickles are read with an
unpickler that only admits numpy arrays and plain containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch import Tensor

__all__ = ["CIFAR_FILES", "download_cifar", "load_cifar"]

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}

# What the CIFAR pickles (written by old and new numpy) may reference, and nothing else.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        return super().find_class(module, name)


def _pixels(path: str, raw) -> np.ndarray:
    """CIFAR pixels as uint8: integers in 0..255 of any numeric dtype, never wrapped or truncated."""
    arr = np.asarray(raw)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "uif" or arr.size == 0:
        raise ValueError(f"{path}: image data must be numbers 0..255, got dtype {arr.dtype}")
    low, high = arr.min(), arr.max()
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255 or (
            arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr))):
        raise ValueError(
            f"{path}: image data must be integers 0..255 (as in the CIFAR files), got {arr.dtype} values in "
            f"[{low}, {high}]" + ("" if arr.dtype.kind != "f" else "; scaled or normalised images are not accepted")
        )
    return arr.astype(np.uint8)


def _read_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, TypeError, ValueError, EOFError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path} is not a CIFAR python-pickle batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR python-pickle batch (holds a {type(entry).__name__}, not a dict)")
    missing = [k for k in (b"data", label_key) if k not in entry]
    if missing:
        raise ValueError(f"{path} is not a CIFAR batch of this dataset: no {', '.join(map(repr, missing))} "
                         f"(keys: {', '.join(map(repr, sorted(entry, key=repr)))})")
    data = _pixels(path, entry[b"data"])
    try:
        labels = np.asarray(entry[label_key])
        if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {labels.shape} labels"
        )
    return data, labels


def load_cifar(data_dir: str | os.PathLike, name: str = "cifar10", train: bool = True) -> tuple[Tensor, Tensor]:
    """``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)`` for one CIFAR split."""
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_FILES)}")
    folder, train_files, test_files, label_key, classes = CIFAR_FILES[name]
    base = os.path.join(os.fspath(data_dir), folder)
    files = train_files if train else test_files
    missing = [f for f in files if not os.path.isfile(os.path.join(base, f))]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: expected {', '.join(os.path.join(base, f) for f in files)} "
            f"(missing {', '.join(missing)}). Unpack {ARCHIVES[name]} from "
            "https://www.cs.toronto.edu/~kriz/cifar.html into the data directory, or pass --download "
            "with torchvision installed"
        )
    parts = [_read_batch(os.path.join(base, f), label_key) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
        raise ValueError(f"{base}: labels must lie in [0, {classes}), got [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def download_cifar(data_dir: str | os.PathLike, name: str = "cifar10") -> None:
    """Fetch the CIFAR files into ``data_dir`` with torchvision, when it is installed and imports."""
    if name not in CIFAR_FILES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_FILES)}")
    try:
        from torchvision import datasets
    except Exception as exc:  # absent, or present but broken against this torch build
        raise RuntimeError(
            f"--download needs a working torchvision ({type(exc).__name__}: {exc}). Instead, download "
            f"{ARCHIVES[name]} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into "
            f"{os.fspath(data_dir)}"
        ) from exc
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    for train in (True, False):
        cls(os.fspath(data_dir), train=train, download=True)
