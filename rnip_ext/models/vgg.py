"""VGG networks: the paper's CIFAR VGG-16, the ImageNet VGG-16 and a small VGG for the demo."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .._validation import is_int
from ._common import builder, check_bn, check_classes, make_bn, paper_init_

__all__ = ["VGG", "vgg16_cifar", "vgg16", "vgg_small", "VGG16_CONFIG"]

# Conv widths of VGG-16 ("D"), "M" = 2x2 max-pool.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def make_features(config: Sequence, bn: str, in_channels: int = 3) -> nn.Sequential:
    """Conv3x3 (no bias: the BatchNorm's mean subtraction cancels it) - BN - ReLU blocks and pools."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), make_bn(bn, item), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` (conv-BN-ReLU stack) -> ``pool`` -> flatten -> ``classifier``."""

    def __init__(self, features: nn.Sequential, pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@builder
def vgg16_cifar(num_classes: int = 10, bn: str = "bounded", in_channels: int = 3) -> VGG:
    """The paper's CIFAR VGG-16: the ``vgg16_bn`` feature stack without its last max-pool,
    ``AvgPool2d(2)`` and ``Linear(512, num_classes)``; 32x32 inputs; paper initialisation.

    ``bn="bounded"`` uses :class:`~rnip_ext.BoundedBatchNorm2d` (13 layers, 4224 channels),
    ``bn="plain"`` ``nn.BatchNorm2d``; ``in_channels=1`` for greyscale data.
    """
    check_classes(num_classes)
    features = make_features(VGG16_CONFIG[:-1], check_bn(bn), in_channels)
    return paper_init_(VGG(features, nn.AvgPool2d(2), nn.Linear(512, num_classes)))


@builder
def vgg16(num_classes: int = 1000, bn: str = "bounded") -> VGG:
    """ImageNet VGG-16 with BatchNorm (torchvision's ``vgg16_bn`` layout, 138M parameters):
    features, ``AdaptiveAvgPool2d(7)``, then 25088-4096-4096-``num_classes`` with ReLU and dropout."""
    check_classes(num_classes)
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, num_classes),
    )
    return paper_init_(VGG(make_features(VGG16_CONFIG, check_bn(bn)), nn.AdaptiveAvgPool2d(7), classifier))


@builder
def vgg_small(
    num_classes: int = 10, bn: str = "bounded", widths: Sequence[int] = (32, 32, 64, 64, 128), in_channels: int = 3
) -> VGG:
    """A small VGG-style network for the demo: conv-BN-ReLU per width, a max-pool after every
    second one, global average pooling and ``Linear(widths[-1], num_classes)``."""
    check_classes(num_classes)
    if not widths or any(not is_int(w) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive ints, got {widths!r}")
    config: list = []
    for i, width in enumerate(widths):
        config.append(width)
        if i % 2 == 1 and i != len(widths) - 1:
            config.append("M")
    features = make_features(config, check_bn(bn), in_channels)
    return paper_init_(VGG(features, nn.AdaptiveAvgPool2d(1), nn.Linear(widths[-1], num_classes)))
