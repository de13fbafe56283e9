"""recalibrate_batchnorm: running statistics re-estimated from batches, nothing else changes."""

import pytest
import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d
from rnip_ext.pruning import recalibrate_batchnorm


def _net():
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), BoundedBatchNorm2d(5, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4),
    )
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
        net[5].running_var.fill_(7.0)
    return net


def test_statistics_are_the_average_over_batches_with_dropout_off():
    net = _net().train()
    batches = [torch.randn(6, 3, 4, 4) for _ in range(3)]
    params = {k: v.clone() for k, v in net.named_parameters()}
    inputs = {1: [], 5: []}
    hooks = [net[i].register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach().clone())) for i in inputs]
    assert recalibrate_batchnorm(net, [(x, None) for x in batches]) is net
    for h in hooks:
        h.remove()
    for i, xs in inputs.items():
        means = torch.stack([x.mean((0, 2, 3)) for x in xs])
        vars_ = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs])
        torch.testing.assert_close(net[i].running_mean, means.mean(0))
        torch.testing.assert_close(net[i].running_var, vars_.mean(0))
        assert int(net[i].num_batches_tracked) == 3
    # Dropout ran in eval mode: the second BatchNorm saw relu(bn1(x)) unmasked.
    with torch.no_grad():
        x1 = inputs[1][0]
        mean, var = x1.mean((0, 2, 3), keepdim=True), x1.var((0, 2, 3), unbiased=False, keepdim=True)
        y1 = torch.sigmoid(net[1].weight)[None, :, None, None] * (x1 - mean) / torch.sqrt(var + net[1].eps)
        expected = net[4](torch.relu(y1))
    torch.testing.assert_close(inputs[5][0], expected)
    assert all(torch.equal(v, params[k]) for k, v in net.named_parameters())
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1  # restored


def test_modes_restored_and_empty_batches_refused_without_change():
    net = _net().train()
    net[3].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(net, iter([]))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    recalibrate_batchnorm(net, [torch.randn(4, 3, 4, 4)])
    assert [m.training for m in net] == [True, True, True, False, True, True]
    with pytest.raises(TypeError, match="batches must yield tensors"):
        recalibrate_batchnorm(net, [["not a tensor"]])
