"""The paper's CIFAR ResNet-56 (He et al. 2016, option-A shortcuts)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import is_int
from ._common import builder, check_bn, check_classes, make_bn, paper_init_

__all__ = ["CifarBasicBlock", "CifarResNet", "PadShortcut", "resnet56_cifar", "resnet_cifar"]


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the new channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (option-A) shortcut, then ReLU.

    ``bn1`` is the block's inner BatchNorm: the only one the paper prunes (its channels touch
    nothing outside the block).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, bn: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_bn(bn, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = make_bn(bn, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv3x3(16) - 3 stages of ``blocks_per_stage`` basic blocks (16/32/64 wide) - pool - linear."""

    def __init__(self, blocks_per_stage: int, num_classes: int, bn: str, in_channels: int = 3) -> None:
        super().__init__()
        check_bn(bn)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = make_bn(bn, 16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(in_planes, planes, stride if i == 0 else 1, bn))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


@builder
def resnet_cifar(depth: int, num_classes: int = 10, bn: str = "bounded", in_channels: int = 3) -> CifarResNet:
    """A CIFAR ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...), paper initialisation."""
    check_classes(num_classes)
    if not is_int(depth) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (e.g. 20, 56), got {depth!r}")
    return paper_init_(CifarResNet((depth - 2) // 6, num_classes, bn, in_channels))


@builder
def resnet56_cifar(num_classes: int = 10, bn: str = "bounded", in_channels: int = 3) -> CifarResNet:
    """The paper's CIFAR ResNet-56: 3 x 9 basic blocks, widths 16/32/64, option-A shortcuts.

    With ``bn="bounded"`` every BatchNorm is a :class:`~rnip_ext.BoundedBatchNorm2d`; the 27
    inner ones (``layerK.i.bn1``, 1008 channels) are those the paper prunes.
    """
    return resnet_cifar(56, num_classes, bn, in_channels)
