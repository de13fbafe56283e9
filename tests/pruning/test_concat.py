"""Channel concatenations: groups feeding ``torch.cat(..., dim=1)`` are pruned through it.

The consumers after the concatenation read each group's channels at an offset; the pruned
network must equal the original with the removed channels' scales set to 0 (shifts kept, so
the folding of their constant output through the concatenation is checked too), and the
plan's FLOPs and parameters must be the pruned network's.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_helpers import assert_same_function, masked_copy
from rnip_ext.pruning import apply, channel_graph, count_flops, count_params, find_channel_groups, plan
from rnip_ext.pruning.channels import forget


def _cbr(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    # Replicate padding: a constant map stays constant through the conv, so every fold is exact.
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode="replicate", bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


class TwoBranches(nn.Module):
    """Two BN'd branches and the block input concatenated into a 1x1 conv (a VoVNet aggregation)."""

    def __init__(self, with_input: bool = False):
        super().__init__()
        self.with_input = with_input
        self.a = _cbr(3, 5)
        self.b = _cbr(5, 6)
        self.agg = nn.Conv2d(5 + 6 + (3 if with_input else 0), 7, 1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        parts = [x, a, b] if self.with_input else [a, b]
        y = F.relu(self.bn(self.agg(torch.cat(parts, dim=1))))
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


class CatIntoLinear(nn.Module):
    """A concatenation flattened into a linear layer: blocks of ``H*W`` features per channel."""

    def __init__(self):
        super().__init__()
        self.a = _cbr(3, 4)
        self.b = _cbr(3, 5)
        self.fc = nn.Linear(9 * 4 * 4, 3)

    def forward(self, x):
        y = torch.concat((self.a(x), self.b(x)), dim=-3)
        return self.fc(torch.flatten(F.max_pool2d(y, 2), 1))


class Nested(nn.Module):
    """Nested concatenations, one group listed twice (two channel ranges of one consumer), a
    GhostNet module (a depthwise-coupled pair concatenated, then a slice that keeps it whole)."""

    def __init__(self):
        super().__init__()
        self.a = _cbr(3, 4)
        self.b = _cbr(3, 3)
        self.c = _cbr(3, 2)
        self.primary = _cbr(13 + 4, 4, 1)
        self.cheap = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.out = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        inner = torch.cat([a, b], 1)
        y = torch.cat([inner, F.relu(c), a], dim=1)  # a at channels 0..3 and 9..12
        p = self.primary(torch.cat([y, a], 1))  # and at 13..16 of a third concatenation
        ghost = torch.cat([p, self.cheap(p)], 1)
        return self.out(ghost[:, :8])


class CatThenNorm(nn.Module):
    """DenseNet's pre-activation: a BatchNorm reads the concatenation, so the branches stay whole."""

    def __init__(self):
        super().__init__()
        self.a = _cbr(3, 4)
        self.b = _cbr(3, 4)
        self.c = _cbr(3, 4)
        self.norm = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        spatial = torch.cat([self.c(x), x[:, :1].expand(-1, 4, -1, -1)], 2)  # along H: not channels
        return self.conv(self.norm(y)).sum() + spatial.sum()


def _prepared(model: nn.Module, shape) -> nn.Module:
    """Spread scales and non-zero shifts (so removed channels leave constants to fold), warm statistics."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        model(torch.randn(8, *shape[1:]))
    return model.eval()


def _check_exact(model: nn.Module, shape, ratios=(0.3, 0.6)) -> None:
    x = torch.randn(*shape)
    for ratio in ratios:
        p = plan(model, ratio, min_channels=1, example_inputs=x)
        # Channels read through a concatenation do go, and every fold is exact (1x1 or
        # replicate-padded consumers), so the comparison below is exact too.
        assert any(len(p.group_keep[g.name]) < g.channels and any(c.width for c in g.consumers) for g in p.groups)
        assert p.inexact_folds == []
        pruned = apply(model, p)
        assert_same_function(pruned, masked_copy(model, p.keep), torch.randn(*shape))
        assert p.flops == (count_flops(model, x), count_flops(pruned, x))
        assert p.params == (count_params(model), count_params(pruned))


@pytest.mark.parametrize("with_input", [False, True])
def test_two_branches_into_a_conv(with_input):
    model = _prepared(TwoBranches(with_input), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in find_channel_groups(model, x)}
    assert set(groups) == {"a.1", "b.1", "bn"}
    skip = 3 if with_input else 0
    (into_b, into_agg) = groups["a.1"].consumers
    assert (into_b.name, into_b.offset, into_b.width) == ("b.0", 0, None)
    assert (into_agg.name, into_agg.offset, into_agg.width) == ("agg", skip, skip + 11)
    (agg,) = groups["b.1"].consumers
    assert (agg.name, agg.offset, agg.width) == ("agg", skip + 5, skip + 11)
    assert not groups["a.1"].renormalised  # one part of agg's input: its scale alone matters
    _check_exact(model, (2, 3, 8, 8))


def test_plan_removes_each_groups_channels_at_its_offset():
    model = _prepared(TwoBranches(with_input=True), (2, 3, 8, 8))
    with torch.no_grad():
        model.a[1].weight.copy_(torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0]))
        model.b[1].weight.copy_(torch.tensor([0.03, 1.0, 1.0, 1.0, 1.0, 0.04]))
        model.bn.weight.fill_(1.0)
        model.a[1].bias.fill_(0.2)  # removed channels output relu(0.2): folded into agg's new bias
    p = plan(model, 4 / 18, min_channels=1, example_inputs=torch.randn(1, 3, 8, 8))
    assert p.group_keep["a.1"].tolist() == [0, 2, 4] and p.group_keep["b.1"].tolist() == [1, 2, 3, 4]
    pruned = apply(model, p)
    # agg's inputs: x (0..2) whole, a's 3+{0,2,4}, b's 8+{1..4}.
    kept = [0, 1, 2, 3, 5, 7, 9, 10, 11, 12]
    torch.testing.assert_close(pruned.agg.weight, model.agg.weight[:, kept])
    assert pruned.agg.in_channels == 10 and pruned.agg.bias is not None  # folded shifts gave it one


def test_concatenation_flattened_into_a_linear_layer():
    model = _prepared(CatIntoLinear(), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in find_channel_groups(model, x)}
    (fc,) = groups["b.1"].consumers
    assert (fc.name, fc.kind, fc.block, fc.offset, fc.width) == ("fc", "linear", 16, 4, 9)
    _check_exact(model, (2, 3, 8, 8))


def test_nested_concatenations_and_a_group_listed_twice():
    model = _prepared(Nested(), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in find_channel_groups(model, x)}
    assert set(groups) == {"a.1", "b.1", "c.1", "primary.1"}
    assert sorted((c.name, c.offset, c.width) for c in groups["a.1"].consumers) == [
        ("primary.0", 0, 17), ("primary.0", 9, 17), ("primary.0", 13, 17)]
    assert [(c.name, c.offset) for c in groups["c.1"].consumers] == [("primary.0", 7)]
    ghost = groups["primary.1"]  # the cheap depthwise pair is coupled and read at two offsets
    assert ghost.bns == ["primary.1", "cheap.1"] and ghost.depthwise == ["cheap.0"]
    assert sorted((c.name, c.source, c.offset, c.width) for c in ghost.consumers) == [
        ("out", "cheap.1", 4, 8), ("out", "primary.1", 0, 8)]
    _check_exact(model, (2, 3, 8, 8), ratios=(0.3, 0.5, 0.8))


def test_narrowed_graph_of_the_pruned_model_has_the_new_offsets():
    model = _prepared(Nested(), (2, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    # min_channels=2: a depthwise conv left with one channel is a plain conv to a new trace.
    pruned = apply(model, plan(model, 0.4, min_channels=2, example_inputs=x))
    handed_over = channel_graph(pruned, x)  # narrowed from the original's, no new trace
    forget(pruned)
    traced = channel_graph(pruned, x)
    assert traced is not handed_over
    for a, b in zip(handed_over.groups, traced.groups, strict=True):
        assert (a.name, a.channels) == (b.name, b.channels)
        assert sorted((c.name, c.offset, c.width) for c in a.consumers) == \
            sorted((c.name, c.offset, c.width) for c in b.consumers)
    assert handed_over.flops() == traced.flops() and handed_over.params() == traced.params()
    _check_exact(pruned, (2, 3, 8, 8), ratios=(0.3,))  # and prunes again from there


def test_norm_after_concatenation_and_spatial_concatenation_still_block():
    model = _prepared(CatThenNorm(), (2, 3, 8, 8))
    graph = channel_graph(model, torch.randn(1, 3, 8, 8))
    assert graph.groups == []
    why = {b.bn: b.construct for b in graph.blockers}
    assert why["a.1"] == why["b.1"] == "concatenation into module BatchNorm2d"
    assert why["c.1"] == "concatenation"  # along the height: offsets mean nothing there
    assert "concatenation into module BatchNorm2d (2 BatchNorms" in graph.blocked_summary()


def test_concatenation_needs_example_inputs_for_its_offsets():
    model = TwoBranches()
    assert {g.name for g in find_channel_groups(model)} == {"bn"}  # no shapes: a and b blocked
    assert {g.name for g in find_channel_groups(model, torch.randn(1, 3, 8, 8))} == {"a.1", "b.1", "bn"}


def test_latency_table_times_a_concatenation_reader_at_its_full_width():
    from pruning_helpers import fake_timer
    from rnip_ext.pruning.latency import LatencyTable

    model = _prepared(TwoBranches(with_input=True), (2, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    table = LatencyTable.build(model, x, points=3, min_channels=2, timer=fake_timer, progress=False)
    layers = {layer.name: layer for layer in table.layers}
    # agg reads x, a and b concatenated: one group cannot narrow it, so it is timed whole
    # (its outputs still follow its own group, bn).
    assert layers["agg"].in_group is None and layers["agg"].in_channels == 14 and layers["agg"].out_group == "bn"
    assert layers["b.0"].in_group == "a.1"
    narrow = {name: 2 for name in table.channels}
    assert table.predict(narrow) < table.predict(table.channels)
