"""convert_batchnorm / from_batchnorm swap plain BatchNorms for bounded ones, carrying state over."""

import pytest
import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d, convert_batchnorm


def small_model(dtype=torch.float32) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=None, eps=1e-3)),
        nn.BatchNorm1d(4, affine=False),  # not 2d: must stay
    ).to(dtype)
    model.train()
    for _ in range(2):
        model[:4](torch.randn(4, 3, 6, 6, dtype=dtype))
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_convert_replaces_every_batchnorm2d_in_place(bias):
    model = small_model(torch.float64)
    old = [model[1], model[3][1]]
    with torch.no_grad():
        old[0].bias.normal_()
    result = convert_batchnorm(model, bias=bias)
    assert result is model
    new = [model[1], model[3][1]]
    assert isinstance(model[4], nn.BatchNorm1d)
    for o, n in zip(old, new):
        assert type(n) is BoundedBatchNorm2d
        assert (n.num_features, n.eps, n.momentum) == (o.num_features, o.eps, o.momentum)
        assert n.weight.dtype == torch.float64 and n.running_mean.dtype == torch.float64
        assert torch.equal(n.running_mean, o.running_mean)
        assert torch.equal(n.running_var, o.running_var)
        assert int(n.num_batches_tracked) == int(o.num_batches_tracked) == 2
        if bias:
            assert torch.equal(n.bias.detach(), o.bias.detach())
        else:
            assert n.bias is None
        # The logit is freshly drawn, not copied from gamma.
        assert not torch.equal(n.weight.detach(), o.weight.detach())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert model[:4](x).shape == (2, 4, 6, 6)


def test_convert_a_lone_layer_returns_the_new_layer_and_keeps_mode_and_grad_flags():
    bn = nn.BatchNorm2d(5, track_running_stats=False).eval()
    bn.weight.requires_grad_(False)
    new = convert_batchnorm(bn)
    assert type(new) is BoundedBatchNorm2d and not new.training
    assert new.running_mean is None and not new.track_running_stats
    assert not new.weight.requires_grad


def test_from_batchnorm_affine_false_and_meta_device():
    bn = nn.BatchNorm2d(3, affine=False)
    new = BoundedBatchNorm2d.from_batchnorm(bn, bias=True)
    assert new.weight is None and new.bias is None and not new.affine
    meta = BoundedBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, device="meta"))
    assert meta.weight.is_meta


def test_bad_inputs_raise_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        convert_batchnorm("not a model")
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        BoundedBatchNorm2d.from_batchnorm(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        BoundedBatchNorm2d.from_batchnorm(nn.SyncBatchNorm(3))


def test_already_bounded_layers_are_left_alone():
    layer = BoundedBatchNorm2d(4)
    model = nn.Sequential(layer)
    convert_batchnorm(model)
    assert model[0] is layer
