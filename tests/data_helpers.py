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


def write_image_folder(root, classes=("cat", "dog", "owl"), per_class=(6, 2, 2), sizes=((20, 14), (9, 12)), seed=0):
    """``root/{train,val,test}/<class>/*.png|jpg``: random RGB images (some greyscale, odd sizes) of
    learnable colours per class; returns ``{split: [(path, class index, uint8 HxWx3 array written)]}``
    (for JPEG files the array is what Pillow decodes, the format being lossy)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for split, n in zip(("train", "val", "test"), per_class):
        written[split] = []
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                h, w = sizes[i % len(sizes)]
                pixels = rng.integers(0, 64, size=(h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] += np.uint8(160)  # the class shows in one colour channel
                ext = "jpg" if i % 3 == 2 else "png"
                path = os.path.join(folder, f"{i:03d}.{ext}")
                image = Image.fromarray(pixels).convert("L") if i % 4 == 3 else Image.fromarray(pixels)
                image.save(path)
                with Image.open(path) as back:
                    written[split].append((path, c, np.asarray(back.convert("RGB"))))
    return written
