"""A MobileNetV2 (Sandler et al. 2018) with inverted residuals and depthwise convolutions."""

from __future__ import annotations

from torch import Tensor, nn

from ._common import builder, check_bn, check_classes, make_bn, paper_init_

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s) per stage.
MOBILENET_V2_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int, bn: str) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), make_bn(bn, out_ch), nn.ReLU6(inplace=True)]


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when shapes allow.

    The expanded channels (the 1x1 expansion's BN and the depthwise conv's BN, tied through the
    depthwise conv) are the prunable ones; the projection feeds the residual stream.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, bn: str) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn_relu(in_ch, hidden, 1, 1, 1, bn)
        layers += _conv_bn_relu(hidden, hidden, 3, stride, hidden, bn)
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), make_bn(bn, out_ch)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def _scaled(channels: int, width_mult: float) -> int:
    # Round to a multiple of 8 (never below 8), as the reference implementation does.
    value = max(8, int(channels * width_mult + 4) // 8 * 8)
    return value + 8 if value < 0.9 * channels * width_mult else value


class MobileNetV2(nn.Module):
    """Stem conv - inverted residual stages - 1x1 conv to ``last_channels`` - pool - dropout - linear."""

    def __init__(self, num_classes: int, width_mult: float, bn: str) -> None:
        super().__init__()
        check_bn(bn)
        in_ch = _scaled(32, width_mult)
        self.last_channels = _scaled(1280, max(1.0, width_mult))
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(3, in_ch, 3, 2, 1, bn))]
        for t, c, n, s in MOBILENET_V2_CONFIG:
            out_ch = _scaled(c, width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, bn))
                in_ch = out_ch
        layers.append(nn.Sequential(*_conv_bn_relu(in_ch, self.last_channels, 1, 1, 1, bn)))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@builder
def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, bn: str = "bounded") -> MobileNetV2:
    """MobileNetV2 (3.5M parameters at ``width_mult=1``), paper initialisation."""
    check_classes(num_classes)
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    return paper_init_(MobileNetV2(num_classes, width_mult, bn))
