"""Dataset loading (CIFAR pickles written here in the exact format, digits) and augmentation."""

import os
import pickle

import numpy as np
import pytest
import torch

from data_helpers import write_cifar
from rnip_ext import data as D


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip_exact_pixels_and_labels(tmp_path, name):
    written = write_cifar(tmp_path, name)
    folder, train_files, test_files, _, _ = D.CIFAR_FILES[name]
    images, labels = D.load_cifar(tmp_path, name, train=True)
    assert images.dtype == torch.uint8 and images.shape == (20 * len(train_files), 3, 32, 32)
    first_data, first_labels = written[train_files[0]]
    # Channel-major rows: the first 1024 bytes are the red plane.
    assert torch.equal(images[0, 0].flatten(), torch.from_numpy(first_data[0, :1024]))
    assert torch.equal(images[0, 2].flatten(), torch.from_numpy(first_data[0, 2048:]))
    assert labels[:20].tolist() == first_labels
    test_images, _ = D.load_cifar(tmp_path, name, train=False)
    assert test_images.shape == (20, 3, 32, 32)


def test_load_dataset_splits_train_and_val_disjointly(tmp_path):
    write_cifar(tmp_path, "cifar10", n_per_file=40)
    splits = D.load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=3)
    assert len(splits.train) == 150 and len(splits.val) == 50 and len(splits.test) == 40
    assert splits.num_classes == 10 and splits.in_channels == 3 and splits.image_size == 32
    train_rows = {bytes(r.numpy()) for r in splits.train.images.flatten(1)}
    val_rows = {bytes(r.numpy()) for r in splits.val.images.flatten(1)}
    assert not train_rows & val_rows
    again = D.load_dataset("cifar10", tmp_path, val_fraction=0.25, seed=3)
    assert torch.equal(again.val.labels, splits.val.labels)


def test_missing_and_malformed_data_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1.*cifar-10-python.tar.gz"):
        D.load_cifar(tmp_path, "cifar10")
    write_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR python-pickle batch"):
        D.load_cifar(tmp_path, "cifar10")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"expected data of shape \(N, 3072\)"):
        D.load_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="--data-dir"):
        D.load_dataset("cifar10", None)


def test_unpickler_refuses_code(tmp_path):
    write_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        D.load_cifar(tmp_path, "cifar10", train=False)


def test_labels_out_of_range_are_rejected(tmp_path):
    write_cifar(tmp_path, "cifar10", classes=12, n_per_file=200)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        D.load_cifar(tmp_path, "cifar10")


def test_digits_embedded_default():
    pytest.importorskip("sklearn", reason="digits ship with scikit-learn (the demo/test extra)")
    splits = D.load_dataset("digits", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1079, 359, 359)
    assert splits.train.images.shape[1:] == (1, 16, 16) and splits.train.images.dtype == torch.uint8
    assert sorted(splits.train.labels.unique().tolist()) == list(range(10))
    x, y = next(splits.train.batches(64))
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3


def test_augment_batch_crops_and_flips_exactly():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = D.augment_batch(images, padding=2, flip=True, generator=gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        # Each output is some crop (possibly mirrored) of its own padded image.
        candidates = [
            padded[i, :, dy : dy + 8, dx : dx + 8].flip(-1) if f else padded[i, :, dy : dy + 8, dx : dx + 8]
            for dy in range(5) for dx in range(5) for f in (False, True)
        ]
        matches = [j for j, c in enumerate(candidates) if torch.equal(c, out[i])]
        assert matches, i
        flips += matches[0] % 2
    assert 10 < flips < 54  # both flipped and unflipped images occur
    assert torch.equal(D.augment_batch(images, padding=0, flip=False), images)


def test_batches_cover_everything_once_and_normalise():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    ds = D.InMemoryDataset(images, torch.arange(10), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    seen = torch.cat([y for _, y in ds.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(10))
    x, y = next(ds.batches(10))
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
    assert sum(1 for _ in ds.batches(3, drop_last=True)) == 3
    with pytest.raises(ValueError, match="uint8"):
        D.InMemoryDataset(images.float(), torch.arange(10), (0.5,), (0.5,))


def _rewrite(path, **changes):
    with open(path, "rb") as f:
        entry = pickle.load(f)
    for key, value in changes.items():
        entry[key.encode()] = value
    with open(path, "wb") as f:
        pickle.dump(entry, f)


@pytest.mark.parametrize("low, high, match", [
    (-3.0, 300.0, r"integers 0\.\.255.*float64 values in \[-3\.0, 300\.0\]"),
    (0.0, 1.0, "scaled or normalised images are not accepted"),
    (0.0, 255.4, "scaled or normalised"),
])
def test_float_pixels_outside_0_255_or_fractional_are_rejected_not_wrapped(tmp_path, low, high, match):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    _rewrite(path, data=np.linspace(low, high, 20 * 3072).reshape(20, 3072))
    with pytest.raises(ValueError, match=match):
        D.load_cifar(tmp_path, "cifar10")


def test_integer_valued_pixels_of_other_dtypes_are_kept_exactly(tmp_path):
    written = write_cifar(tmp_path, "cifar10")
    data, _ = written["data_batch_1"]
    _rewrite(tmp_path / "cifar-10-batches-py" / "data_batch_1", data=data.astype(np.float32))
    images, _ = D.load_cifar(tmp_path, "cifar10")
    assert torch.equal(images[:20].reshape(20, 3072), torch.from_numpy(data))
    _rewrite(tmp_path / "cifar-10-batches-py" / "data_batch_1", data=data.astype(np.int64) + 256)
    with pytest.raises(ValueError, match=r"in \[256, "):
        D.load_cifar(tmp_path, "cifar10")


def test_wrong_keys_and_truncated_files_name_the_problem(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry[b"fine_labels"] = entry.pop(b"labels")  # a CIFAR-100 file among CIFAR-10 ones
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(ValueError, match=r"data_batch_4 is not a CIFAR batch of this dataset: no b'labels'.*b'fine_labels'"):
        D.load_cifar(tmp_path, "cifar10")
    write_cifar(tmp_path, "cifar10")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="data_batch_4 is not a CIFAR python-pickle batch"):
        D.load_cifar(tmp_path, "cifar10")
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        D.load_cifar(tmp_path, "cifar10")
