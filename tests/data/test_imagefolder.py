"""rnip_ext.data.imagefolder: one folder per class of PNG/JPEG files, decoded in worker processes."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_helpers import write_image_folder
from rnip_ext.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, load_image_folder
from rnip_ext.data import imagefolder as IF

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)


@pytest.fixture()
def folder(tmp_path):
    return tmp_path, write_image_folder(tmp_path)


def _reference(pixels: np.ndarray, size: int) -> torch.Tensor:
    """float64: shorter side to ``size`` (antialiased bilinear, rounded to uint8), centre crop, normalise."""
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).double()
    h, w = image.shape[1:]
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    if new != (h, w):
        image = F.interpolate(image[None], size=new, mode="bilinear", align_corners=False,
                              antialias=True)[0].round().clamp(0, 255)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return (image[:, top:top + size, left:left + size] / 255 - MEAN) / STD


def test_classes_labels_and_pixels_against_a_float64_reference(folder):
    root, written = folder
    data = ImageFolder(root / "train", image_size=9, decoder="pil")
    assert data.classes == ["cat", "dog", "owl"] and data.decoder == "pil" and len(data) == 18
    by_path = {p: (c, a) for p, c, a in written["train"]}
    for i in range(len(data)):
        x, label = data[i]
        path = data.samples[i][0]
        assert label == by_path[path][0] and x.shape == (3, 9, 9) and x.dtype == torch.float32
        # 9 is the shorter side of the 9x12 images: no resize, exact; the 20x14 ones are resized.
        tol = 0 if min(by_path[path][1].shape[:2]) == 9 else 1.01 / 255 / min(IMAGENET_STD)
        torch.testing.assert_close(x.double(), _reference(by_path[path][1], 9), rtol=0, atol=tol + 1e-6)
    # Greyscale files come out as three equal channels (before normalisation).
    grey = next(i for i, (p, _) in enumerate(data.samples) if p.endswith("003.png"))
    pixels = data.load(grey)
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_training_images_are_shifted_and_flipped_copies(folder):
    root, _ = folder
    data = ImageFolder(root / "train", image_size=8, train=True)
    plain = ImageFolder(root / "train", image_size=8)
    torch.manual_seed(0)
    a = [data[i][0] for i in range(6)]
    torch.manual_seed(0)
    assert all(torch.equal(x, data[i][0]) for i, x in enumerate(a))  # seeded: reproducible
    pad = 1
    for i, x in enumerate(a):
        base = F.pad(plain.load(i), (pad,) * 4)
        candidates = [base[:, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        candidates += [c.flip(-1) for c in candidates]
        norm = [((c.float() / 255 - plain.mean) / plain.std) for c in candidates]
        assert any(torch.equal(x, c) for c in norm), i


def test_splits_val_carved_or_read_and_test_optional(folder, tmp_path):
    root, _ = folder
    splits = load_image_folder(root, 8)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    assert splits.num_classes == 3 and splits.in_channels == 3 and splits.image_size == 8
    assert splits.train.train and not splits.val.train and not splits.test.train
    flat = load_image_folder(root / "train", 8, val_fraction=0.25, seed=1)  # class folders at the top
    assert flat.test is None and (len(flat.train), len(flat.val)) == (14, 4)  # round(4.5)
    train_files = {flat.train.dataset.samples[i][0] for i in flat.train.indices}
    val_files = {flat.val.dataset.samples[i][0] for i in flat.val.indices}
    assert not train_files & val_files and len(train_files | val_files) == 18
    assert flat.train.dataset.train and not flat.val.dataset.train
    again = load_image_folder(root / "train", 8, val_fraction=0.25, seed=1)
    assert again.val.indices == flat.val.indices


def test_bad_folders_name_the_problem(folder, tmp_path):
    root, _ = folder
    with pytest.raises(FileNotFoundError, match="no image folder"):
        ImageFolder(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no class folders"):
        ImageFolder(tmp_path / "empty", 8)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(tmp_path / "noimg", 8)
    os.rename(root / "val" / "owl", root / "val" / "bird")
    with pytest.raises(ValueError, match="different class folders"):
        load_image_folder(root, 8)
    bad = root / "train" / "cat" / "zzz.png"
    bad.write_bytes(b"not a png")
    data = ImageFolder(root / "train", 8, decoder="pil")
    with pytest.raises(ValueError, match="cannot read .*zzz.png as an image"):
        data[[p for p, _ in data.samples].index(str(bad))]
    for kwargs, match in (({"image_size": 0}, "image_size"), ({"image_size": 8, "mean": (0.5,)}, "3 values"),
                          ({"image_size": 8, "decoder": "cv2"}, "decoder must be")):
        with pytest.raises(ValueError, match=match):
            ImageFolder(root / "test", **kwargs)


def test_torchvision_decodes_when_it_can(folder, monkeypatch):
    from zoo_models import torchvision_models

    root, _ = folder
    torchvision_models()  # the test-only import stub; on this machine torchvision cannot decode images
    auto = ImageFolder(root / "test", 8)
    if IF._torchvision_decode() is not None:
        try:
            IF._torchvision_decode()(auto.samples[0][0])
            works = True
        except Exception:
            works = False
        assert auto.decoder == ("torchvision" if works else "pil")
    # A torchvision that decodes is used (stand-in decoder: Pillow's, so pixels must agree).
    monkeypatch.setattr(IF, "_torchvision_decode", lambda: IF._pil_decode)
    tv = ImageFolder(root / "test", 8)
    pil = ImageFolder(root / "test", 8, decoder="pil")
    assert tv.decoder == "torchvision" and all(torch.equal(tv[i][0], pil[i][0]) for i in range(len(tv)))
    monkeypatch.setattr(IF, "_torchvision_decode", lambda: None)
    assert ImageFolder(root / "test", 8).decoder == "pil"
    with pytest.raises(ImportError, match="torchvision does not import"):
        ImageFolder(root / "test", 8, decoder="torchvision")


def test_the_trainer_streams_it_through_worker_processes(folder):
    from rnip_ext import models
    from rnip_ext.callbacks import Evaluate
    from rnip_ext.training import fit

    root, _ = folder
    splits = load_image_folder(root, 16)
    torch.manual_seed(0)
    model = models.vgg_small(3, "bounded", widths=(4, 4, 8), in_channels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    best = fit(model, splits, epochs=1, batch_size=4, num_workers=1, lr=0.05, progress=False,
               callbacks=[Evaluate(splits.val, splits.test, num_workers=1)])
    assert 0 <= best["metrics"]["val_accuracy"] <= 1 and 0 <= best["metrics"]["test_accuracy"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
