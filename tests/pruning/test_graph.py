"""Channel groups found by the fx analysis on the supported architectures and on tricky graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnip_ext import BoundedBatchNorm2d
from rnip_ext import models as M
from rnip_ext.pruning import PruningTraceError, channel_importance, count_flops, find_channel_groups, plan


def test_vgg16_every_bn_is_its_own_group_and_the_last_feeds_the_linear():
    groups = find_channel_groups(M.vgg16_cifar())
    assert len(groups) == 13 and sum(g.channels for g in groups) == 4224
    last = groups[-1]
    assert [c.name for c in last.consumers] == ["classifier"]
    assert last.consumers[0].kind == "linear" and last.consumers[0].block == 1


def test_resnet56_only_inner_block_channels():
    groups = find_channel_groups(M.resnet56_cifar())
    assert [g.name for g in groups] == [f"layer{s}.{i}.bn1" for s in (1, 2, 3) for i in range(9)]
    assert sum(g.channels for g in groups) == 1008
    assert all(g.producer.endswith("conv1") and g.consumers[0].name.endswith("conv2") for g in groups)


def test_resnet50_bottleneck_inner_channels_and_stem():
    names = {g.name for g in find_channel_groups(M.resnet50())}
    assert "layer1.0.bn1" in names and "layer1.0.bn2" in names
    assert not any(n.endswith("bn3") or "downsample" in n for n in names)
    # The stem feeds layer1.0's conv1 and its downsample conv only: prunable.
    assert "bn1" in names


def test_mobilenet_depthwise_couples_bns():
    groups = {g.name: g for g in find_channel_groups(M.mobilenet_v2(width_mult=0.5))}
    expand = groups["features.2.conv.1"]
    assert expand.bns == ["features.2.conv.1", "features.2.conv.4"]
    assert expand.depthwise == ["features.2.conv.3"]
    assert [c.name for c in expand.consumers] == ["features.2.conv.6"]
    assert "features.2.conv.4" not in groups  # claimed by the group before it


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = BoundedBatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = BoundedBatchNorm2d(4)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.bn3 = BoundedBatchNorm2d(6)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a)) + a  # residual: bn1 and bn2 blocked
        c = self.bn3(self.conv3(torch.cat([a, b], 1)))  # concat: blocked too
        return self.head(F.relu(c).view(c.size(0), -1))  # view-flatten into a linear


def test_residuals_and_concatenations_block_but_view_flatten_is_followed():
    model = Residual()
    assert [g.name for g in find_channel_groups(model)] == []  # view unknown without shapes
    groups = find_channel_groups(model, example_inputs=torch.randn(2, 4, 4, 4))
    assert [g.name for g in groups] == ["bn3"]
    assert groups[0].consumers[0].kind == "linear" and groups[0].consumers[0].block == 16


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))  # the same layers twice


def test_layers_used_twice_are_never_pruned():
    assert find_channel_groups(Shared()) == []


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 1), BoundedBatchNorm2d(3))
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inner(x))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), BoundedBatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # in the model's own forward: nothing to keep as a leaf


def test_untraceable_submodule_is_kept_whole_and_named_by_the_plan():
    model, x = Untraceable(), torch.randn(1, 3, 4, 4)
    assert find_channel_groups(model, x) == []  # the BatchNorm feeds the opaque module
    with pytest.raises(ValueError, match=r"no prunable BatchNorm2d.*fx cannot trace.*gate"):
        plan(model, 0.3, example_inputs=x)
    assert count_flops(model, x) == 3 * 3 * 16  # the layers still count


def test_untraceable_model_error_names_the_module_and_points_to_torch_pruning():
    with pytest.raises(PruningTraceError, match=r"module 'UntraceableRoot'.*torch_pruning"):
        find_channel_groups(UntraceableRoot())


def test_channel_importance_scores():
    model = M.vgg_small(widths=(8, 8, 16))
    bounded = channel_importance(model, score="paper")
    assert list(bounded) == ["features.1", "features.4", "features.8"]
    torch.testing.assert_close(bounded["features.4"], torch.sigmoid(model.features[4].weight.detach()))
    plain = M.vgg_small(widths=(8, 8, 16), bn="plain")
    with torch.no_grad():
        plain.features[1].weight.normal_()
    scores = channel_importance(plain, score="paper")
    torch.testing.assert_close(scores["features.1"], plain.features[1].weight.detach().abs())


class Eca(nn.Module):
    """ECA: a Conv1d along the channels of the pooled tensor gates them (each gate value mixes
    ``k`` neighbouring channels)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.gate = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.plain, self.plain_bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        y = self.gate(x.mean((2, 3)).view(x.shape[0], 1, -1))
        x = x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)
        return self.head(F.relu(self.plain_bn(self.plain(x))))


def test_an_eca_gate_blocks_its_batchnorm_and_is_named():
    model, x = Eca(), torch.randn(1, 3, 6, 6)
    p = plan(model, 0.3, min_channels=1, example_inputs=x)
    assert [g.name for g in p.groups] == ["plain_bn"]  # the layer after the gate still prunes
    (blocker,) = [b for b in p.blockers if b.bn == "bn"]
    assert "Conv1d across the channels" in blocker.construct and "ECA" in blocker.construct
