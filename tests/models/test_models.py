"""The model zoo: the paper's architectures, sizes, BatchNorm kinds and initialisation."""

import math

import pytest
import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d
from rnip_ext import models as M


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_layers(model: nn.Module, kind: type) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


def test_vgg16_cifar_structure_and_size():
    model = M.vgg16_cifar(num_classes=100)
    bns = bn_layers(model, BoundedBatchNorm2d)
    assert len(bns) == 13 and sum(b.num_features for b in bns) == 4224
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 4  # last max-pool dropped
    assert isinstance(model.pool, nn.AvgPool2d)
    assert model.classifier.in_features == 512 and model.classifier.out_features == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet56_cifar_structure_and_size():
    model = M.resnet56_cifar()
    blocks = [m for m in model.modules() if isinstance(m, M.CifarBasicBlock)]
    assert len(blocks) == 27
    assert sum(b.bn1.num_features for b in blocks) == 1008  # the prunable inner channels
    assert 0.85e6 < n_params(model) < 0.86e6  # option-A shortcuts have no parameters
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    shortcut = M.PadShortcut(stride=2, extra_channels=16)
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


@pytest.mark.parametrize(
    "builder,params",
    [(M.resnet18, 11_689_512), (M.resnet50, 25_557_032), (M.vgg16, 138_365_992), (M.mobilenet_v2, 3_504_872)],
)
def test_imagenet_models_match_torchvision_parameter_counts(builder, params):
    # torchvision's counts include BN shifts; our bounded BN has none, so add them back.
    model = builder()
    shifts = sum(b.num_features for b in bn_layers(model, BoundedBatchNorm2d))
    conv_biases = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None)
    expected = params - shifts - (conv_biases if builder is M.vgg16 else 0)
    assert n_params(model) == expected
    assert n_params(builder(bn="plain")) == expected + shifts


def test_plain_bn_and_paper_init():
    model = M.vgg16_cifar(bn="plain")
    assert not bn_layers(model, BoundedBatchNorm2d)
    for bn in bn_layers(model, nn.BatchNorm2d):
        assert torch.all(bn.weight == 0.5) and torch.all(bn.bias == 0)
    conv = model.features[0]
    expected_std = math.sqrt(2.0 / (9 * conv.out_channels))
    big = M.vgg16_cifar().features[-3]  # a 512x512x3x3 conv: enough samples for the std
    assert abs(big.weight.std().item() - math.sqrt(2.0 / (9 * 512))) < 0.05 * math.sqrt(2.0 / (9 * 512))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.3)
    assert abs(model.classifier.weight.std().item() - 0.01) < 0.002
    assert torch.all(model.classifier.bias == 0)
    logits = torch.cat([b.weight.detach() for b in bn_layers(M.vgg16_cifar(), BoundedBatchNorm2d)])
    assert abs(logits.mean().item()) < 0.1 and abs(logits.std().item() - 1) < 0.1


def test_vgg_small_and_mobilenet_small_inputs():
    model = M.vgg_small(num_classes=4, widths=(8, 8, 16), in_channels=1)
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 4)
    mb = M.mobilenet_v2(num_classes=10, width_mult=0.25)
    assert mb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    depthwise = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bn must be one of"):
        M.vgg16_cifar(bn="batch")
    with pytest.raises(ValueError, match="num_classes"):
        M.resnet56_cifar(num_classes=0)
    with pytest.raises(ValueError, match="depth"):
        M.resnet_cifar(21)
    with pytest.raises(ValueError, match="widths"):
        M.vgg_small(widths=())
    with pytest.raises(ValueError, match="width_mult"):
        M.mobilenet_v2(width_mult=0)
