"""ImageNet ResNet-18/50 with torchvision's BasicBlock/Bottleneck structure (no torchvision needed)."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import builder, check_bn, check_classes, make_bn, paper_init_

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (1x1 conv-BN when the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, bn: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = make_bn(bn, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = make_bn(bn, planes)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride, bn)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand x4, and a shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, bn: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = make_bn(bn, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = make_bn(bn, planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = make_bn(bn, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride, bn)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_planes: int, out_planes: int, stride: int, bn: str) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), make_bn(bn, out_planes))


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7 stem, max-pool, four stages (64/128/256/512 planes), pool, linear."""

    def __init__(self, block: type, layers: tuple[int, int, int, int], num_classes: int, bn: str) -> None:
        super().__init__()
        check_bn(bn)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_bn(bn, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        stages = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1, bn))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@builder
def resnet18(num_classes: int = 1000, bn: str = "bounded") -> ResNet:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]), paper initialisation."""
    return paper_init_(ResNet(BasicBlock, (2, 2, 2, 2), check_classes(num_classes), bn))


@builder
def resnet50(num_classes: int = 1000, bn: str = "bounded") -> ResNet:
    """ResNet-50 (Bottleneck x [3, 4, 6, 3], 25.6M parameters), paper initialisation."""
    return paper_init_(ResNet(Bottleneck, (3, 4, 6, 3), check_classes(num_classes), bn))
