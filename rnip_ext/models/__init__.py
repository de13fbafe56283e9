"""Model definitions used by the paper, the pruning tests and the demo (no torchvision needed).

Every builder takes ``bn="bounded"`` (:class:`~rnip_ext.BoundedBatchNorm2d`) or ``bn="plain"``
(``nn.BatchNorm2d``) and applies the paper's initialisation (:func:`paper_init_`).
"""

from ._common import paper_init_
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet50
from .cifar_resnet import CifarBasicBlock, CifarResNet, PadShortcut, resnet56_cifar, resnet_cifar
from .vgg import VGG, vgg16, vgg16_cifar, vgg_small

__all__ = [
    "paper_init_",
    "VGG",
    "vgg16_cifar",
    "vgg16",
    "vgg_small",
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "resnet56_cifar",
    "resnet_cifar",
    "ResNet",
    "resnet18",
    "resnet50",
    "MobileNetV2",
    "mobilenet_v2",
]
