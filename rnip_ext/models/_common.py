"""Pieces shared by the model definitions: the BatchNorm factory and the paper's initialisation."""

from __future__ import annotations

import functools
import inspect
import math

from torch import nn

from .._validation import is_int
from ..nn import BoundedBatchNorm2d

BN_KINDS = ("bounded", "plain")


def check_bn(bn: str) -> str:
    if bn not in BN_KINDS:
        raise ValueError(f"bn must be one of {BN_KINDS}, got {bn!r}")
    return bn


def make_bn(bn: str, channels: int) -> nn.Module:
    """``BoundedBatchNorm2d(channels)`` (no shift) for ``bn="bounded"``, ``nn.BatchNorm2d`` for ``"plain"``."""
    return BoundedBatchNorm2d(channels) if check_bn(bn) == "bounded" else nn.BatchNorm2d(channels)


def check_classes(num_classes: int) -> int:
    if not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def paper_init_(model: nn.Module) -> nn.Module:
    """The initialisation of Suteu & Guo's code, in place; returns ``model``.

    Convolutions ``N(0, sqrt(2 / (k_h * k_w * out_channels)))`` with zero bias; linear layers
    ``N(0, 0.01)`` with zero bias; bounded BatchNorm logits ``N(0, 1)``; plain BatchNorm
    ``gamma = 0.5``, ``beta = 0`` (their baselines' setting).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, BoundedBatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.constant_(m.weight, 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def builder(fn):
    """Mark a model builder: the model it returns remembers ``rnip_builder = {"name", "kwargs"}``,
    so :func:`rnip_ext.pruning.load` can rebuild the architecture from a checkpoint alone."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def build(*args, **kwargs):
        model = fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        model.rnip_builder = {
            "name": fn.__name__,
            "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in bound.arguments.items()},
        }
        return model

    return build
