"""Layers: the bounded BatchNorm and helpers that put it into existing models."""

from .bounded_batchnorm import BoundedBatchNorm2d
from .convert import convert_batchnorm

__all__ = ["BoundedBatchNorm2d", "convert_batchnorm"]
