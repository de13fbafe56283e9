"""convert_batchnorm / from_batchnorm swap plain BatchNorms for bounded ones, carrying state over."""

import copy

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
def test_fresh_mode_replaces_every_batchnorm2d_in_place(bias):
    model = small_model(torch.float64)
    old = [model[1], model[3][1]]
    with torch.no_grad():
        old[0].bias.normal_()
    result = convert_batchnorm(model, mode="fresh", bias=bias)
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
    new = convert_batchnorm(bn, mode="fresh")
    assert type(new) is BoundedBatchNorm2d and not new.training
    assert new.running_mean is None and not new.track_running_stats
    assert not new.weight.requires_grad


def test_a_lone_layer_converts_exactly_when_its_gammas_are_in_0_1():
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.0, 0.9)
        bn.bias.normal_()
        bn.running_mean.normal_()
    new = convert_batchnorm(copy.deepcopy(bn))
    assert type(new) is BoundedBatchNorm2d and new.bias is not None
    x = torch.randn(4, 5, 3, 3)
    for training in (False, True):
        bn.train(training), new.train(training)
        torch.testing.assert_close(new(x), bn(x))
    with torch.no_grad():
        bn.weight[0] = -0.5  # nothing before a lone layer can take the sign
    with pytest.raises(ValueError, match="'BatchNorm2d': 1 negative gamma"):
        convert_batchnorm(bn)


def test_from_batchnorm_affine_false_and_meta_device():
    bn = nn.BatchNorm2d(3, affine=False)
    new = BoundedBatchNorm2d.from_batchnorm(bn, bias=True)
    assert new.weight is None and new.bias is None and not new.affine
    meta = BoundedBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, device="meta"))
    assert meta.weight.is_meta


def test_bad_inputs_raise_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        convert_batchnorm("not a model")
    with pytest.raises(ValueError, match="mode must be one of"):
        convert_batchnorm(small_model(), mode="exactly")
    with pytest.raises(TypeError, match="bias must be True, False or None"):
        convert_batchnorm(small_model(), bias=1)
    for headroom in (1.0, 0.5, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ValueError, match="headroom must be a finite number > 1"):
            convert_batchnorm(small_model(), headroom=headroom)
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        BoundedBatchNorm2d.from_batchnorm(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="nn.BatchNorm2d"):
        BoundedBatchNorm2d.from_batchnorm(nn.SyncBatchNorm(3))


def test_already_bounded_layers_are_left_alone():
    layer = BoundedBatchNorm2d(4)
    model = nn.Sequential(layer)
    convert_batchnorm(model)
    assert model[0] is layer


def test_default_keeps_the_shift_and_fresh_mode_drops_it():
    model = small_model()[:3].append(nn.Conv2d(8, 2, 1))
    exact = convert_batchnorm(copy.deepcopy(model))
    fresh = convert_batchnorm(copy.deepcopy(model), mode="fresh")
    assert exact[1].bias is not None and fresh[1].bias is None


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class SameForward(nn.BatchNorm2d):
    pass


def test_subclasses_with_their_own_forward_are_refused_and_nothing_changes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), OwnForward(4))
    with pytest.raises(TypeError, match=r"'2' is a OwnForward, a BatchNorm2d subclass with its own forward"):
        convert_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d
    same = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), SameForward(4), nn.Conv2d(4, 2, 1)))
    assert type(same[1]) is BoundedBatchNorm2d


def test_batchnorms_with_hooks_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ValueError, match="BatchNorm '1' has hooks"):
        convert_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d


def test_sync_batchnorm_becomes_sync_bounded_and_keeps_the_function():
    from rnip_ext import SyncBoundedBatchNorm2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        model[1].weight.uniform_(-2, 2)
        model[1].bias.normal_()
        model[1].running_var.uniform_(0.5, 2)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    converted = convert_batchnorm(copy.deepcopy(model))
    assert type(converted[1]) is SyncBoundedBatchNorm2d
    x = torch.randn(4, 3, 5, 5)
    for training in (False, True):  # no process group: both fall back to local statistics
        model.train(training), converted.train(training)
        torch.testing.assert_close(converted(x), model(x))
