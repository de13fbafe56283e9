"""The embedded default dataset: the 1,797 8x8 handwritten digits shipped inside scikit-learn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits"]


def load_digits(size: int = 16) -> tuple[Tensor, Tensor]:
    """``(images, labels)``: uint8 ``(1797, 1, size, size)`` (bilinear upsampling of the 0..16
    grey levels to 0..255) and int64 labels 0..9. No download: the data ships with scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'rnip_ext[demo]' (or scikit-learn)"
        ) from exc
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(bunch.target).long()
