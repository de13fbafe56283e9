"""``channel_costs`` and the cost-weighted regulariser with ``residual_streams=True``.

A stream's channel costs what removing it from the whole stream saves. Checked by brute force:
remove one channel of a group (``plan_from_keep`` + ``apply``) and count the FLOPs and parameters
of both networks; the difference is the group's channel cost (summed over its BatchNorms, which
share it). Small residual networks: basic blocks with an identity and a projection shortcut, and
a RepVGG-like block whose convs read the stream and write into it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnip_ext import RecedingRegularizer, convert_batchnorm
from rnip_ext.pruning import apply, channel_costs, channel_graph, count_flops, count_params, plan_from_keep


class Basic(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (identity, or 1x1 conv-BN projection), ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class ResNetTiny(nn.Module):
    """Stem, an identity block, a projection block, average pool, linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block1, self.block2 = Basic(8, 8), Basic(8, 12, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.stem_bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class RepTiny(nn.Module):
    """Stem, two RepVGG blocks relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 6, 3, 2, 1, bias=False), nn.BatchNorm2d(6)
        self.kxk = nn.ModuleList(nn.Conv2d(6, 6, 3, padding=1, bias=False) for _ in range(2))
        self.bn_kxk = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(2))
        self.one = nn.ModuleList(nn.Conv2d(6, 6, 1, bias=False) for _ in range(2))
        self.bn_one = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(2))
        self.identity = nn.ModuleList(nn.BatchNorm2d(6) for _ in range(2))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        for i in range(2):
            x = F.relu(self.bn_kxk[i](self.kxk[i](x)) + self.bn_one[i](self.one[i](x)) + self.identity[i](x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def removed_one(model, x, group, channel):
    """FLOPs and parameters saved by removing ``channel`` of ``group`` (by pruning it)."""
    keep = [c for c in range(group.channels) if c != channel]
    pruned = apply(model, plan_from_keep(model, {group.name: keep}, example_inputs=x, residual_streams=True))
    return count_flops(model, x) - count_flops(pruned, x), count_params(model) - count_params(pruned)


@pytest.mark.parametrize("net", [ResNetTiny, RepTiny])
def test_a_channel_costs_what_removing_it_saves_brute_force(net):
    torch.manual_seed(0)
    model = net().eval()  # fresh BatchNorms: shift 0, so no fold adds a bias to count
    x = torch.randn(1, 3, 16, 16)
    flops = channel_costs(model, x, "flops", residual_streams=True)
    params = channel_costs(model, x, "params", residual_streams=True)
    groups = channel_graph(model, x, residual_streams=True).groups
    assert any(g.residual for g in groups)
    assert set(flops) == {bn for g in groups for bn in g.bns}
    for g in groups:
        # Every BatchNorm of a group carries an equal share of the channel's cost.
        assert len({flops[bn] for bn in g.bns}) == 1 and len({params[bn] for bn in g.bns}) == 1
        channel = int(torch.randint(g.channels, ()))
        saved_flops, saved_params = removed_one(model, x, g, channel)
        assert sum(flops[bn] for bn in g.bns) == pytest.approx(saved_flops), g.name
        assert sum(params[bn] for bn in g.bns) == pytest.approx(saved_params), g.name


def test_default_costs_leave_the_streams_out_and_match_their_inner_groups():
    model = ResNetTiny().eval()
    x = torch.randn(1, 3, 16, 16)
    default = channel_costs(model, x)
    streams = channel_costs(model, x, residual_streams=True)
    assert set(default) == {"block1.bn1", "block2.bn1"}  # the streams are kept whole by default
    assert {"stem_bn", "block1.bn2", "block2.bn2", "block2.down.1"} <= set(streams)
    assert all(streams[bn] == default[bn] for bn in default)  # inner groups are the same groups
    with pytest.raises(TypeError, match="residual_streams must be a bool"):
        channel_costs(model, x, residual_streams="yes")


@pytest.mark.parametrize("cost", ["flops", "params"])
def test_cost_weighted_regulariser_reads_the_stream_groups(cost):
    model = convert_batchnorm(ResNetTiny())
    x = torch.randn(1, 3, 16, 16)
    default = RecedingRegularizer(model, cost=cost, example_inputs=x)
    reg = RecedingRegularizer(model, cost=cost, example_inputs=x, residual_streams=True)
    by_name = dict(zip(reg.names, reg.weights))
    assert all(k > 0 for k in reg.weights)  # every BatchNorm is in some group now
    assert dict(zip(default.names, default.weights))["stem_bn"] == 0.0  # by default the stream is whole
    costs = channel_costs(model, x, cost, residual_streams=True)
    ratios = [by_name[n] / costs[n] for n in reg.names]
    assert max(ratios) == pytest.approx(min(ratios))  # weights proportional to the stream costs
    n = [m.num_features for m in reg.layers]
    assert sum(k * c for k, c in zip(reg.weights, n)) == pytest.approx(sum(n))  # mean 1
    with pytest.raises(TypeError, match="residual_streams must be a bool"):
        RecedingRegularizer(model, cost=cost, example_inputs=x, residual_streams=1)
