"""Batch augmentation on whatever device the batch lives on (no per-image Python work)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment_batch", "normalize"]


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float ``(images / 255 - mean) / std`` per channel."""
    return (images.float().div_(255.0) - mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def augment_batch(images: Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding by ``padding`` pixels, and random horizontal flips.

    The paper's CIFAR augmentation. Every image gets its own offsets ``(dy, dx)`` in
    ``[0, 2 * padding]`` and a coin for the flip; one gather does all crops at once.
    """
    n, c, h, w = images.shape
    if n == 0 or (padding == 0 and not flip):
        return images
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rand = lambda high: torch.randint(0, high, (n,), generator=generator, device="cpu").to(device)  # noqa: E731
    dy, dx = rand(2 * padding + 1), rand(2 * padding + 1)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        flipped = rand(2).bool()
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h, device=device)
    cols = dx[:, None] + cols
    batch = torch.arange(n, device=device)[:, None, None]
    # padded[n, :, rows[n, i], cols[n, j]] -> (N, H, W, C)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
