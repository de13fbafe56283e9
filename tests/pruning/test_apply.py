"""Pruned networks compute the same function as the original with removed channels zeroed."""

import pytest
import torch
from torch import nn

from pruning_helpers import ARCHITECTURES, assert_same_function, masked_copy, warmed_up
from rnip_ext import BoundedBatchNorm2d, prune
from rnip_ext import models as M
from rnip_ext.pruning import apply, count_flops, count_params, plan


@pytest.mark.parametrize("name,build,shape", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
@pytest.mark.parametrize("bn", ["bounded", "plain"])
def test_exactness_on_every_architecture(name, build, shape, bn):
    model = warmed_up(build(bn), shape)
    x = torch.randn(*shape)
    for scope, ratio in (("global", 0.3), ("local", 0.6), ("global", 0.9)):
        p = plan(model, ratio, scope, example_inputs=x)
        assert p.keep, "a positive ratio must remove channels"
        pruned = apply(model, p)
        assert_same_function(pruned, masked_copy(model, p.keep), x)
        # Counts drop as the plan says, and really are the pruned model's.
        assert p.params[0] == count_params(model) and p.params[1] == count_params(pruned)
        assert p.flops[0] == count_flops(model, x) and p.flops[1] == count_flops(pruned, x)
        assert p.params[1] < p.params[0] and p.flops[1] < p.flops[0]
        modules = dict(pruned.named_modules())
        for bn_name, kept in p.keep.items():
            assert modules[bn_name].num_features == len(kept)
            assert modules[bn_name].running_mean.shape == (len(kept),)


def test_original_untouched_and_state_carried_over():
    model = warmed_up(M.vgg16_cifar(), (2, 3, 32, 32))
    model.features[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    pruned = prune(model, 0.5, example_inputs=torch.randn(1, 3, 32, 32))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pruned.training
    assert not pruned.features[0].weight.requires_grad and pruned.features[3].weight.requires_grad
    bn = pruned.features[1]
    assert isinstance(bn, BoundedBatchNorm2d)
    assert int(bn.num_batches_tracked) == int(model.features[1].num_batches_tracked) == 2
    no_shared = {id(p) for p in model.parameters()} & {id(p) for p in pruned.parameters()}
    assert not no_shared
    # Training goes on: a step through the pruned network works.
    pruned(torch.randn(4, 3, 32, 32)).sum().backward()
    assert pruned.features[3].weight.grad is not None


def test_kept_channels_are_the_most_important_globally():
    model = M.vgg_small(widths=(8, 8, 16))
    with torch.no_grad():
        for i, bn in enumerate([model.features[1], model.features[4], model.features[8]]):
            bn.weight.copy_(torch.linspace(-3, 3, bn.num_features) + i)
    p = plan(model, 0.5, min_channels=1, example_inputs=torch.randn(1, 3, 16, 16))
    scores = torch.cat([p.scores[g.name] for g in p.groups])
    kept = torch.cat([p.scores[g.name][p.group_keep[g.name]] for g in p.groups])
    assert len(kept) == 16 and torch.all(kept.min() >= scores.sort().values[16])
    assert p.threshold == pytest.approx(scores.sort().values[15].item())
    assert p.achieved_ratio == 0.5


@pytest.mark.parametrize("scope", ["global", "local"])
def test_min_channels_and_all_equal_scores(scope):
    model = M.vgg_small(widths=(8, 8, 16), bn="plain")  # gamma = 0.5 everywhere: all ties
    p = plan(model, 0.95, scope, min_channels=3, example_inputs=torch.randn(1, 3, 16, 16))
    for g in p.groups:
        assert len(p.group_keep[g.name]) >= 3
    # Keeps are sorted int64 and the plan's ratio says what happened.
    for keep in p.keep.values():
        assert keep.dtype == torch.int64 and torch.equal(keep, keep.sort().values)
    assert 0.5 < p.achieved_ratio < 0.95
    local = plan(model, 0.5, "local", example_inputs=torch.randn(1, 3, 16, 16))
    assert [len(local.group_keep[g.name]) for g in local.groups] == [4, 4, 8]


def test_ratio_zero_removes_nothing():
    model = M.vgg_small(widths=(8, 8))
    p = plan(model, 0.0, example_inputs=torch.randn(1, 3, 8, 8))
    assert p.keep == {} and p.params[0] == p.params[1] and p.achieved_ratio == 0
    assert "parameters" in str(p)


class BiasedHead(nn.Module):
    """Bounded BN with a shift, followed by an activation whose f(beta) != 0 into 1x1 and linear."""

    def __init__(self, padding: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BoundedBatchNorm2d(8, bias=True)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 6, 3 if padding else 1, padding=padding, bias=False)
        self.bn2 = BoundedBatchNorm2d(6, bias=True)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.conv2(self.act(self.bn1(self.conv1(x))))
        return self.fc(torch.sigmoid(self.bn2(x)).flatten(1))


def test_shift_of_removed_channels_is_folded_exactly_into_1x1_conv_and_linear():
    model = BiasedHead(padding=0)
    with torch.no_grad():
        model.bn1.bias.normal_()
        model.bn2.bias.normal_()
    model = warmed_up(model, (2, 3, 4, 4), spread_scales=False)
    x = torch.randn(3, 3, 4, 4)
    p = plan(model, 0.5, example_inputs=x, fold="refuse")
    assert p.inexact_folds == []
    pruned = apply(model, p)
    assert pruned.conv2.bias is not None  # created to hold the fold
    assert p.params[1] == count_params(pruned)
    assert_same_function(pruned, masked_copy(model, p.keep), x)


def test_inexact_fold_is_reported_and_can_be_refused():
    model = BiasedHead(padding=1)
    with torch.no_grad():
        model.bn1.bias.normal_()
    x = torch.randn(2, 3, 4, 4)
    p = plan(model, 0.5, example_inputs=x)
    assert p.inexact_folds == ["conv2"] and "approximate folds" in str(p)
    with pytest.raises(ValueError, match="fold='approximate'"):
        plan(model, 0.5, example_inputs=x, fold="refuse")
    pruned = apply(model.eval(), p)
    # Approximate, but far closer than dropping the constants outright.
    ref = masked_copy(model, p.keep)(x)
    assert (pruned(x) - ref).abs().max() < ref.abs().max()


class PooledHead(nn.Module):
    """A shifted BN, then an average pool that does not keep constants, then a 1x1 conv."""

    def __init__(self, pool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = BoundedBatchNorm2d(8, bias=True)
        self.pool = pool
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(x) if isinstance(self.pool, nn.Module) else nn.functional.avg_pool2d(x, 3, 1, 1)
        return self.conv2(x)


@pytest.mark.parametrize("pool", ["functional-padded", nn.AvgPool2d(2, divisor_override=3), nn.AvgPool2d(3, 1, 1)],
                         ids=["functional-padded", "divisor-override", "module-padded"])
def test_folds_through_average_pools_that_change_constants_are_reported(pool):
    model = PooledHead(None if isinstance(pool, str) else pool)
    with torch.no_grad():
        model.bn1.bias.uniform_(0.5, 1.0)  # relu(beta) != 0: there is something to fold
    x = torch.randn(2, 3, 6, 6)
    assert plan(model, 0.5, example_inputs=x).inexact_folds == ["conv2"]
    with pytest.raises(ValueError, match="fold='approximate'"):
        plan(model, 0.5, example_inputs=x, fold="refuse")
    exact = PooledHead(nn.AvgPool2d(3, 1, 1, count_include_pad=False))
    with torch.no_grad():
        exact.bn1.bias.uniform_(0.5, 1.0)
    p = plan(exact, 0.5, example_inputs=x, fold="refuse")
    assert p.inexact_folds == []
    assert_same_function(apply(exact.eval(), p), masked_copy(exact, p.keep), x)


def test_bad_arguments():
    model = M.vgg_small(widths=(8, 8))
    x = torch.randn(1, 3, 8, 8)
    for ratio in (-0.1, 1.0, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="ratio must be a number in"):
            plan(model, ratio, example_inputs=x)
    with pytest.raises(ValueError, match="min_channels"):
        plan(model, 0.5, min_channels=0, example_inputs=x)
    with pytest.raises(ValueError, match="scope"):
        plan(model, 0.5, scope="layer", example_inputs=x)
    with pytest.raises(ValueError, match="fold"):
        plan(model, 0.5, example_inputs=x, fold="exact")
    with pytest.raises(ValueError, match="example_inputs"):
        plan(model, 0.5, example_inputs=None)
    with pytest.raises(ValueError, match="no prunable BatchNorm2d"):
        plan(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), 0.5, example_inputs=x)
    p = plan(model, 0.5, example_inputs=x)
    with pytest.raises(ValueError, match="different model"):
        apply(M.vgg_small(widths=(8, 16)), p)
    with pytest.raises(ValueError, match="different model"):
        apply(M.resnet56_cifar(), p)
    with pytest.raises(TypeError, match="PruningPlan"):
        apply(model, {"features.1": torch.arange(3)})
