"""Writes small datasets in the exact CIFAR python-pickle format, for the data and CLI tests."""

import os
import pickle

import numpy as np

from rnip_ext import data as D


def write_cifar(root, name="cifar10", n_per_file=20, classes=None, seed=0):
    """Small files in the exact python-pickle CIFAR layout; returns the written (data, labels)."""
    folder, train_files, test_files, label_key, n_classes = D.CIFAR_FILES[name]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    written = {}
    for fname in train_files + test_files:
        data = rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes or n_classes, size=n_per_file).tolist()
        entry = {b"batch_label": fname.encode(), label_key: labels, b"data": data, b"filenames": [b"x.png"] * n_per_file}
        if name == "cifar100":
            entry[b"coarse_labels"] = [0] * n_per_file
        with open(os.path.join(root, folder, fname), "wb") as f:
            pickle.dump(entry, f)
        written[fname] = (data, labels)
    return written
