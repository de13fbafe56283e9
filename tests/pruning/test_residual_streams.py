"""``residual_streams=True``: a residual stream pruned as one channel group.

Small hand-written networks: two basic blocks (an identity and a projection shortcut), a
RepVGG-like block (an identity-branch BatchNorm), a stream into pooling + flatten + linear, and
streams that must stay whole (a concatenation, a BatchNorm after the sum, the network's output,
option-A shortcuts). Exactness as in test_zoo.py: the pruned network equals the original with
the removed channels masked (every group BatchNorm's scale and shift of those channels set to 0),
and with the shifts kept where every fold is exact (the constants summed through the stream).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnip_ext import BoundedBatchNorm2d, BudgetPruner
from rnip_ext import models as M
from rnip_ext.pruning import (apply, channel_graph, channel_importance, count_flops, count_params, find_channel_groups,
                              plan, plan_from_keep)
from pruning_helpers import fake_timer, zero_removed
from rnip_ext.pruning.importance import group_scores
from rnip_ext.pruning.latency import LatencyTable
from rnip_ext.pruning.latency_plan import plan_to_latency


class Basic(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (identity, or 1x1 conv-BN projection), ReLU."""

    def __init__(self, cin, cout, stride=1, k=3):
        super().__init__()
        pad = k // 2
        self.conv1 = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, k, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class TwoBlocks(nn.Module):
    """Stem conv-BN-ReLU-maxpool, an identity block, a projection block, avgpool-flatten-linear."""

    def __init__(self, k=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, k, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.block1 = Basic(8, 8, k=k)
        self.block2 = Basic(8, 12, stride=2, k=k)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class RepBlock(nn.Module):
    """RepVGG: relu(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), the last an identity branch."""

    def __init__(self, c):
        super().__init__()
        self.conv_kxk = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn_kxk = nn.BatchNorm2d(c)
        self.conv_1x1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn_kxk(self.conv_kxk(x)) + self.bn_1x1(self.conv_1x1(x)) + self.identity(x))


class RepNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 2, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(6)
        self.blocks = nn.Sequential(RepBlock(6), RepBlock(6))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def prepared(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Spread scales U(0.05, 1), shifts U(-0.1, 0.1), running statistics of one batch, eval mode."""
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.weight.uniform_(0.05, 1.0)
        m.bias.uniform_(-0.1, 0.1)
        m.reset_running_stats()
        m.momentum = None
    model.train()
    model(torch.randn(4, *x.shape[1:]))
    return model.eval()


def masked(model: nn.Module, keep: dict, shifts: bool) -> nn.Module:
    """A copy with the removed channels' scales (and, with ``shifts``, shifts) set to 0."""
    return zero_removed(copy.deepcopy(model), keep, shifts=shifts)


def canonical(groups):
    """Groups as comparable values (graph nodes by name: each trace has its own node objects)."""
    return [(g.name, g.bns, g.producers, g.channels, g.depthwise, g.gates, g.unit, g.renormalised,
             [(c.name, c.kind, c.block, c.source, [n.name for n in c.path]) for c in g.consumers]) for g in groups]


def check_exact(model, p, x, shifts=True):
    """The pruned network equals the masked original; predicted counts equal counted ones."""
    pruned = apply(model, p)
    with torch.no_grad():
        got, want = pruned(x), masked(model, p.keep, shifts)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert p.flops == (count_flops(model, x), count_flops(pruned, x))
    assert p.params == (count_params(model), count_params(pruned))
    return pruned


def test_two_blocks_couple_stem_identity_and_projection_streams():
    x = torch.randn(2, 3, 16, 16)
    model = TwoBlocks()
    default = find_channel_groups(model, x)
    assert [g.name for g in default] == ["block1.bn1", "block2.bn1"]  # streams kept whole
    groups = {g.name: g for g in find_channel_groups(model, x, residual_streams=True)}
    # A group is named by its first BatchNorm in graph order (the projection runs first here).
    assert list(groups) == ["bn1", "block1.bn1", "block2.down.1", "block2.bn1"]

    stem = groups["bn1"]  # stem BN (through the max pool) + block1's last BN, summed by the identity
    assert stem.residual and len(stem.additions) == 1
    assert stem.bns == ["bn1", "block1.bn2"] and stem.producers == ["conv1", "block1.conv2"]
    assert stem.producer == "conv1"
    assert {c.name for c in stem.consumers} == {"block1.conv1", "block2.conv1", "block2.down.0"}

    head = groups["block2.down.1"]  # block2's last BN + the projection's BN, read by the classifier
    assert set(head.bns) == {"block2.bn2", "block2.down.1"}
    assert set(head.producers) == {"block2.conv2", "block2.down.0"}
    assert [(c.name, c.kind, c.block) for c in head.consumers] == [("fc", "linear", 1)]
    # block2.down.0 reads one stream and writes the next: sliced on both sides.
    assert "block2.down.0" in head.modules() and "block2.down.0" in stem.modules()
    # The inner groups are exactly the default analysis's.
    inner = [g for g in groups.values() if not g.residual]
    assert canonical(inner) == canonical(default)
    assert not channel_graph(model, x, residual_streams=True).blockers


def test_default_is_unchanged_and_the_cache_is_keyed_by_the_option():
    x = torch.randn(1, 3, 16, 16)
    model = TwoBlocks()
    default = channel_graph(model, x)
    streams = channel_graph(model, x, residual_streams=True)
    assert default is channel_graph(model, x) and streams is channel_graph(model, x, residual_streams=True)
    assert streams is not default and not default.residual_streams and streams.residual_streams
    assert {b.bn for b in default.blockers} == {"bn1", "block1.bn2", "block2.bn2", "block2.down.1"}
    assert all(b.construct == "residual addition" for b in default.blockers)
    assert canonical(default.groups) == canonical(find_channel_groups(model, x, residual_streams=False))
    with pytest.raises(TypeError, match="residual_streams must be a bool"):
        channel_graph(model, x, residual_streams=1)


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_two_blocks_pruned_exactly_to_a_flops_budget(target):
    x = torch.randn(2, 3, 16, 16)
    model = prepared(TwoBlocks(), x)
    with pytest.raises(ValueError, match="cannot be met"):
        plan(model, target_flops=target, example_inputs=x)  # streams whole: out of reach
    p = plan(model, target_flops=target, example_inputs=x, residual_streams=True)
    assert p.achieved_flops <= target and p.residual_streams
    assert "block2.down.1" in p.keep and torch.equal(p.keep["block2.down.1"], p.keep["block2.bn2"])
    zero_removed(model, p.keep, scales=False)  # the test_zoo way: removed shifts 0, nothing left to fold
    check_exact(model, plan(model, target_flops=target, example_inputs=x, residual_streams=True), x)


def test_constants_fold_exactly_through_the_sums_with_1x1_consumers():
    """Shifts kept: a removed channel outputs its shift in every BatchNorm of the stream; the
    consumers (1x1 convs, the linear head) get the constant of the sum through the ReLUs."""
    x = torch.randn(2, 3, 8, 8)
    model = prepared(TwoBlocks(k=1), x)
    p = plan(model, 0.4, example_inputs=x, residual_streams=True)
    assert {"bn1", "block2.down.1"} <= set(p.keep)  # both streams lose channels
    assert p.inexact_folds == []
    check_exact(model, p, x, shifts=False)
    # kxk zero-padded consumers: the fold is approximate, and said so.
    model3 = prepared(TwoBlocks(k=3), x)
    p3 = plan(model3, 0.4, example_inputs=x, residual_streams=True)
    assert set(p3.inexact_folds) & {"block1.conv1", "block2.conv1"}, p3.inexact_folds
    with pytest.raises(ValueError, match="approximate fold"):
        plan(model3, 0.4, example_inputs=x, residual_streams=True, fold="refuse")


def test_repvgg_identity_branch_batchnorms_are_sliced_with_the_stream():
    x = torch.randn(2, 3, 16, 16)
    model = prepared(RepNet(), x)
    with pytest.raises(ValueError, match=r"no prunable BatchNorm2d.*residual addition.*"
                                         r"\(residual_streams=True prunes each residual stream as one group\)"):
        plan(model, 0.3, example_inputs=x)
    (g,) = find_channel_groups(model, x, residual_streams=True)
    assert set(g.bns) == {"stem_bn", "blocks.0.bn_kxk", "blocks.0.bn_1x1", "blocks.0.identity",
                          "blocks.1.bn_kxk", "blocks.1.bn_1x1", "blocks.1.identity"}
    assert set(g.producers) == {"stem", "blocks.0.conv_kxk", "blocks.0.conv_1x1", "blocks.1.conv_kxk",
                                "blocks.1.conv_1x1"}
    assert len(g.additions) == 4
    # Each block's convs read the stream and write into it: sliced on both sides.
    assert {c.name for c in g.consumers} == {"blocks.0.conv_kxk", "blocks.0.conv_1x1", "blocks.1.conv_kxk",
                                             "blocks.1.conv_1x1", "head"}
    p = plan(model, 0.5, example_inputs=x, residual_streams=True)
    assert len(p.keep["blocks.1.identity"]) == 3
    zero_removed(model, p.keep, scales=False)
    pruned = check_exact(model, plan(model, 0.5, example_inputs=x, residual_streams=True), x)
    assert pruned.blocks[1].identity.num_features == 3 and pruned.blocks[1].conv_kxk.weight.shape[:2] == (3, 3)


def test_stream_score_is_the_max_over_its_batchnorms_relative_to_the_group():
    x = torch.randn(1, 3, 16, 16)
    model = RepNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(0.01)
        model.blocks[0].bn_1x1.weight[2] = 0.5  # channel 2 alive in one summand only
        model.blocks[1].identity.weight[4] = -2.0  # channel 4: |gamma| = 2, the group's largest
    (g,) = find_channel_groups(model, x, residual_streams=True)
    scores = group_scores(model, [g], "paper")[g.name]
    torch.testing.assert_close(scores, torch.tensor([0.01, 0.01, 0.5, 0.01, 2.0, 0.01]))
    g.renormalised = True  # relative: divided by the group's largest score, not each layer's
    relative = group_scores(model, [g])[g.name]
    torch.testing.assert_close(relative, torch.tensor([0.005, 0.005, 0.25, 0.005, 1.0, 0.005]))
    per_bn = channel_importance(model, x, score="paper", residual_streams=True)
    assert set(per_bn) == set(g.bns)


class IntoConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn_cat = nn.BatchNorm2d(8)
        self.conv_out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = F.relu(self.bn_a(self.conv_a(x)))
        s = F.relu(a + self.bn_b(self.conv_b(a)))
        return self.conv_out(F.relu(self.bn_cat(torch.cat([s, a], 1))))


class PreActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn_after = nn.BatchNorm2d(4)
        self.conv_out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.bn_a(self.conv_a(x))
        s = a + self.bn_b(self.conv_b(F.relu(a)))
        return self.conv_out(F.relu(self.bn_after(s)))


class ToOutput(PreActivation):
    def forward(self, x):
        a = self.bn_a(self.conv_a(x))
        return a + self.bn_b(self.conv_b(F.relu(a)))


@pytest.mark.parametrize("net,construct", [
    (IntoConcat, "concatenation"),
    (PreActivation, "BatchNorm after a residual addition (BatchNorm2d)"),
    (ToOutput, "the network's output"),
])
def test_streams_meeting_anything_else_stay_whole_with_the_blocker_named(net, construct):
    x = torch.randn(1, 3, 4, 4)
    model = net()
    graph = channel_graph(model, x, residual_streams=True)
    assert not any(g.residual for g in graph.groups)
    stream_bns = {"bn_a", "bn_b"}
    named = {b.bn: b.construct for b in graph.blockers if b.bn in stream_bns}
    assert set(named) == stream_bns and all(construct in c for c in named.values()), named


def test_option_a_shortcuts_keep_resnet_cifar_streams_whole():
    model = M.resnet_cifar(20)
    default = find_channel_groups(model)
    graph = channel_graph(model, residual_streams=True)
    assert canonical(graph.groups) == canonical(default)  # the inner channels only, as in the paper
    constructs = {b.construct for b in graph.blockers}
    assert constructs == {"indexing / split", "zero padding (F.pad, e.g. an option-A shortcut)"}, constructs


def test_budget_pruner_takes_the_option():
    x = torch.randn(1, 3, 16, 16)
    pruner = BudgetPruner(TwoBlocksBounded(), x, target_flops=0.4, epochs=6, residual_streams=True)
    assert pruner.residual_streams and pruner.state_dict()["settings"]["residual_streams"] is True
    with pytest.raises(ValueError, match="cannot be met"):
        BudgetPruner(TwoBlocksBounded(), x, target_flops=0.4, epochs=6)
    with pytest.raises(TypeError, match="residual_streams must be a bool"):
        BudgetPruner(TwoBlocksBounded(), x, target_flops=0.4, epochs=6, residual_streams="yes")


def test_latency_table_times_the_stream_groups():
    x = torch.randn(2, 3, 16, 16)
    model = prepared(TwoBlocks(), x)
    table = LatencyTable.build(model, x, points=3, min_channels=2, timer=fake_timer, progress=False,
                               residual_streams=True)
    assert table.residual_streams and set(table.channels) == {"bn1", "block1.bn1", "block2.down.1", "block2.bn1"}
    p = plan_to_latency(model, example_inputs=x, target_latency=0.3, latency_table=table, min_channels=2,
                        timer=fake_timer, residual_streams=True)
    assert {"bn1", "block2.down.1"} <= set(p.keep)  # the streams narrowed too
    assert fake_timer(apply(model, p), (x,)) <= 0.3 * table.full * (1 + 1e-9)
    with pytest.raises(ValueError, match="built with residual_streams=True"):
        plan(model, target_latency=0.3, example_inputs=x, latency_table=table)
    with pytest.raises(ValueError, match="reads and writes the same channel group"):
        LatencyTable.build(RepNet(), x, points=2, timer=fake_timer, progress=False, residual_streams=True)


def TwoBlocksBounded(k: int = 3) -> nn.Module:
    """TwoBlocks with bounded BatchNorms (what BudgetPruner regularises)."""
    from rnip_ext import convert_batchnorm

    return convert_batchnorm(TwoBlocks(k=k))


@torch.no_grad()
def test_bounded_batchnorms_prune_exactly_with_streams():
    """Bounded BatchNorms: a removed channel has logit -inf (scale sigmoid(-inf) = 0) in every
    BatchNorm of its group; their shifts, where they have one, are folded through the sums."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(1)
    model = TwoBlocksBounded(k=1)
    bns = [m for m in model.modules() if isinstance(m, BoundedBatchNorm2d)]
    for m in bns:
        m.weight.normal_(0.0, 2.0)
        if m.bias is not None:
            m.bias.uniform_(-0.1, 0.1)
    model.train()
    model(torch.randn(4, 3, 8, 8))
    model.eval()
    p = plan(model, 0.4, example_inputs=x, residual_streams=True)
    assert {"bn1", "block2.down.1"} <= set(p.keep) and p.inexact_folds == []
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for name, kept in p.keep.items():
        removed = torch.ones(modules[name].num_features, dtype=torch.bool)
        removed[kept] = False
        modules[name].weight[removed] = -math.inf
    got, want = apply(model, p)(x), reference(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_budget_pruner_narrows_the_stream_in_a_training_loop():
    from budget_helpers import X0, loader, own_net, train_interval

    model = own_net(0)  # stem -> one residual block -> wide middle -> head; bounded BatchNorms
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = loader(0)
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=6, optimizer=opt, residual_streams=True)
    for _ in range(6):
        train_interval(model, data, opt, pruner)
        pruner.step(opt)
    assert count_flops(model, X0) <= 0.3 * pruner.original_flops
    # The stream (stem BatchNorm + the block's last one) lost channels, alike in both.
    assert model.stem[1].num_features == model.block.bn2.num_features < 8
    assert model.block.conv1.in_channels == model.mid[0].in_channels == model.stem[1].num_features
    train_interval(model, data, opt, None)  # training goes on with the narrowed network
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 2)


class StreamIntoConcat(nn.Module):
    """A stream read by a 1x1 conv through a concatenation with another group's channels."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.conv_b, self.bn_b = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.conv_c, self.bn_c = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv_out, self.bn_out = nn.Conv2d(10, 5, 1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        a = F.relu(self.bn_a(self.conv_a(x)))
        s = F.relu(a + self.bn_b(self.conv_b(a)))
        y = torch.cat([F.relu(self.bn_c(self.conv_c(x))), s], 1)
        y = F.relu(self.bn_out(self.conv_out(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_a_stream_read_through_a_concatenation_folds_exactly():
    x = torch.randn(2, 3, 6, 6)
    model = prepared(StreamIntoConcat(), x)
    stream = next(g for g in find_channel_groups(model, x, residual_streams=True) if g.residual)
    assert [(c.name, c.offset) for c in stream.consumers] == [("conv_b", 0), ("conv_out", 4)]
    p = plan_from_keep(model, {"bn_a": [0, 2, 5], "bn_c": [1, 3]}, example_inputs=x, residual_streams=True)
    assert torch.equal(p.keep["bn_b"], torch.tensor([0, 2, 5])) and p.inexact_folds == []
    pruned = check_exact(model, p, x, shifts=False)  # shifts kept: the stream's constants folded at offset 4
    assert pruned.conv_out.in_channels == 5
