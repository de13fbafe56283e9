"""Shared helpers for the pruning tests: warmed-up models and the masked-original reference."""

import copy
import math

import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d
from rnip_ext import models as M

import zoo_models

# (name, builder, input shape): every architecture the pruner must handle.
ARCHITECTURES = [
    ("vgg16_cifar", lambda bn: M.vgg16_cifar(bn=bn), (2, 3, 32, 32)),
    ("resnet56_cifar", lambda bn: M.resnet56_cifar(bn=bn), (2, 3, 32, 32)),
    ("resnet18", lambda bn: M.resnet18(num_classes=10, bn=bn), (2, 3, 64, 64)),
    ("resnet50", lambda bn: M.resnet50(num_classes=10, bn=bn), (2, 3, 64, 64)),
    ("mobilenet_v2", lambda bn: M.mobilenet_v2(num_classes=10, width_mult=0.5, bn=bn), (2, 3, 32, 32)),
]


def warmed_up(model: nn.Module, shape, spread_scales: bool = True) -> nn.Module:
    """Random running statistics and scales (plain BN gamma is 0.5 everywhere after init), eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and spread_scales:
                m.weight.uniform_(0.0, 1.0)
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.5)  # the paper's 0.01 makes outputs tiny
        model.train()
        for _ in range(2):
            model(torch.randn(8, *shape[1:]))
    return model.eval()


def masked_copy(model: nn.Module, keep: dict) -> nn.Module:
    """The original with every removed channel's scale set to exactly zero."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, kept in keep.items():
            bn = modules[name]
            mask = torch.ones(bn.num_features, dtype=torch.bool)
            mask[kept] = False
            bn.weight[mask] = -math.inf if isinstance(bn, BoundedBatchNorm2d) else 0.0
    return masked


def assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """Outputs equal to fp32 rounding, relative to the output's magnitude."""
    with torch.no_grad():
        ya, yb = a(x), b(x)
    scale = yb.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5 * scale)


def fake_timer(module, inputs):
    """Deterministic seconds for latency tests: 1 ns per multiply-accumulate of the conv/linear
    layers plus 1 us per layer call."""
    macs = []

    def hook(m, args, out):
        per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) \
            else m.in_features
        macs.append(out.numel() * per_out + 1000)

    hooks = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return 1e-9 * sum(macs)


@torch.no_grad()
def zoo_prepared(source: str, name: str) -> nn.Module:
    """The model with spread scales, small shifts and one batch of running statistics, in eval mode."""
    torch.manual_seed(0)
    model = zoo_models.build(source, name)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.weight.uniform_(0.05, 1.0)
        m.bias.uniform_(-0.1, 0.1)
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(torch.randn(4, *zoo_models.input_size(name)[1:]))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


@torch.no_grad()
def zero_removed(model: nn.Module, keep: dict, scales: bool = True, shifts: bool = True) -> nn.Module:
    """The removed channels' shifts (with ``shifts``) and scales (with ``scales``) set to 0, in
    place; returns ``model``."""
    modules = dict(model.named_modules())
    for name, kept in keep.items():
        bn = modules[name]
        removed = torch.ones(bn.num_features, dtype=torch.bool)
        removed[kept] = False
        if shifts:
            bn.bias[removed] = 0.0
        if scales:
            bn.weight[removed] = 0.0
    return model
