"""Layers: the bounded BatchNorm, its synchronised and norm-activation variants, and helpers that put them into models."""

from .bounded_batchnorm import BoundedBatchNorm2d
from .convert import convert_batchnorm, convert_sync_batchnorm, revert_sync_batchnorm
from .norm_act import BoundedBatchNormAct2d, SyncBoundedBatchNormAct2d, is_norm_act
from .sync_bounded_batchnorm import SyncBoundedBatchNorm2d

__all__ = [
    "BoundedBatchNorm2d",
    "BoundedBatchNormAct2d",
    "SyncBoundedBatchNorm2d",
    "SyncBoundedBatchNormAct2d",
    "is_norm_act",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
]
