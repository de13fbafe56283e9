"""Image classification data streamed from disk: one folder per class of JPEG/PNG files.

    DIR/train/<class>/*.jpg|png ...     (or DIR/<class>/... : validation carved from it)
    DIR/val/<class>/...                 (optional: else ``val_fraction`` of train, seeded)
    DIR/test/<class>/...                (optional)

The layout ``torchvision.datasets.ImageFolder`` reads; classes are the sorted folder names.
Each image is decoded (``torchvision.io.decode_image`` when torchvision is installed and can
decode, Pillow otherwise), converted to RGB, its shorter side resized to ``image_size``
(bilinear, antialiased) and centre-cropped to a square; training images are then randomly
shifted (zero padding of ``image_size // 8``) and flipped; then ``(x / 255 - mean) / std``.
Decoding happens in the ``DataLoader``'s worker processes (:func:`rnip_ext.training.fit`'s
``num_workers``), so nothing beyond a batch needs to fit in memory.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .._validation import check_int
from .dataset import DataSplits

__all__ = ["IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolder", "load_image_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _scan(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<image>.jpg|png)")
    samples = []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, f), index) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise ValueError(f"{root} holds no images with the extensions {', '.join(IMAGE_EXTENSIONS)}")
    return classes, samples


def _pil_decode(path: str) -> Tensor:
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3) \
            .permute(2, 0, 1).contiguous()


def _torchvision_decode():
    """``decode(path) -> uint8 (3, H, W)`` through torchvision, or ``None`` when it is missing or cannot decode."""
    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except Exception:  # not installed, or a build that does not import with this torch
        return None

    def decode(path: str) -> Tensor:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)

    return decode


class ImageFolder(Dataset):
    """``(image, class index)`` pairs of an image folder (see the module docstring): a float32
    ``(3, image_size, image_size)`` normalised image; ``train=True`` augments.

    ``decoder``: ``"auto"`` (torchvision when it decodes the first image, else Pillow),
    ``"torchvision"`` or ``"pil"``; :attr:`decoder` says which one is used.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *,
                 train: bool = False, decoder: str = "auto", samples=None, classes=None) -> None:
        root = os.fspath(root)
        check_int("image_size", image_size, 1)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values (RGB), std > 0; got {tuple(mean)} and {tuple(std)}")
        if decoder not in ("auto", "torchvision", "pil"):
            raise ValueError(f"decoder must be 'auto', 'torchvision' or 'pil', got {decoder!r}")
        self.root, self.image_size, self.train = root, image_size, train
        if samples is None:
            classes, samples = _scan(root)
        self.classes, self.samples = list(classes), list(samples)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.decoder, self._decode = self._choose(decoder)

    def _choose(self, decoder: str):
        if decoder != "pil":
            tv = _torchvision_decode()
            if tv is not None:
                try:
                    tv(self.samples[0][0])
                    return "torchvision", tv
                except Exception as exc:
                    if decoder == "torchvision":
                        raise RuntimeError(f"torchvision cannot decode {self.samples[0][0]} ({exc})") from exc
            elif decoder == "torchvision":
                raise ImportError("decoder='torchvision' but torchvision does not import")
        try:
            import PIL  # noqa: F401
        except ImportError as exc:
            raise ImportError("reading images needs Pillow (pip install pillow) or a working torchvision") from exc
        return "pil", _pil_decode

    def __getstate__(self):  # worker processes re-choose the decoder (functions of torchvision do not pickle)
        state = dict(self.__dict__)
        state["_decode"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._decode = _pil_decode if self.decoder == "pil" else _torchvision_decode()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tensor:
        """Image ``index`` as uint8 ``(3, image_size, image_size)``: decoded, resized, centre-cropped."""
        path = self.samples[index][0]
        try:
            image = self._decode(path)
        except Exception as exc:
            raise ValueError(f"cannot read {path} as an image ({type(exc).__name__}: {exc})") from exc
        s = self.image_size
        h, w = image.shape[1:]
        scale = s / min(h, w)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
        if size != (h, w):
            image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        return image[:, top:top + s, left:left + s]

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.train:
            pad = max(1, self.image_size // 8)
            dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
            image = F.pad(image, (pad, pad, pad, pad))[:, dy:dy + self.image_size, dx:dx + self.image_size]
            if bool(torch.randint(0, 2, ()).item()):
                image = image.flip(-1)
        x = (image.float() / 255.0 - self.mean) / self.std
        return x, self.samples[index][1]


def load_image_folder(root: str | os.PathLike, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *,
                      val_fraction: float = 0.1, seed: int = 0, decoder: str = "auto") -> DataSplits:
    """Train/validation/test splits of an image folder (layout in the module docstring): training
    images augmented, the others not; ``test`` is ``None`` without ``root/test``. A validation split
    carved from the training images takes ``val_fraction`` of them (seeded by ``seed``)."""
    root = os.fspath(root)
    train_root = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    kw = dict(image_size=image_size, mean=mean, std=std, decoder=decoder)
    train = ImageFolder(train_root, train=True, **kw)
    val_root = os.path.join(root, "val")
    if train_root != root and os.path.isdir(val_root):
        val = ImageFolder(val_root, **kw)
        if val.classes != train.classes:
            raise ValueError(f"{val_root} and {train_root} have different class folders")
    else:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) to carve a validation split, got {val_fraction}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(len(train) * val_fraction))
        if n_val >= len(train):
            raise ValueError(f"{train_root} has {len(train)} images: too few to carve a validation split")
        plain = ImageFolder(train_root, samples=train.samples, classes=train.classes, **kw)
        val = Subset(plain, order[:n_val].sort().values.tolist())
        train = Subset(train, order[n_val:].sort().values.tolist())
    test_root = os.path.join(root, "test")
    test = ImageFolder(test_root, **kw) if train_root != root and os.path.isdir(test_root) else None
    classes = (train.dataset if isinstance(train, Subset) else train).classes
    return DataSplits(train, val, test, len(classes), 3, image_size)
