"""Layers: the bounded BatchNorm, its synchronised variant and helpers that put them into models."""

from .bounded_batchnorm import BoundedBatchNorm2d
from .convert import convert_batchnorm, convert_sync_batchnorm, revert_sync_batchnorm
from .sync_bounded_batchnorm import SyncBoundedBatchNorm2d

__all__ = [
    "BoundedBatchNorm2d",
    "SyncBoundedBatchNorm2d",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
]
