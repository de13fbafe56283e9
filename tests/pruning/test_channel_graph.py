"""The channel graph: one trace per model, handed over by apply; grouped convs, gates, norm-act layers,
layer subclasses, untraceable parts, and the coverage report.

References: a fresh trace of the pruned model (the handed-over graph must equal it), forward hooks
on the pruned model (FLOPs), and the original with removed channels masked (the function).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_helpers import assert_same_function, masked_copy, warmed_up
from rnip_ext import BoundedBatchNorm2d
from rnip_ext import models as M
from rnip_ext.nn.norm_act import BoundedBatchNormAct2d
from rnip_ext.pruning import (apply, channel_graph, channel_importance, count_flops, count_params,
                              find_channel_groups, plan, plan_from_keep)
from rnip_ext.pruning import channels as CG


def _hook_flops(model, x):
    """MACs measured by running the model (not read from any graph)."""
    return sum(c.macs for c in CG.layer_shapes_via_hooks(model, x).values())


def _same_graph(a, b):
    assert [(g.bns, g.producer, g.channels, g.depthwise, g.gates, g.unit, g.renormalised,
             [(c.name, c.kind, c.block, c.source) for c in g.consumers]) for g in a.groups] == \
        [(g.bns, g.producer, g.channels, g.depthwise, g.gates, g.unit, g.renormalised,
          [(c.name, c.kind, c.block, c.source) for c in g.consumers]) for g in b.groups]
    assert {n: c.macs for n, c in a.costs.items()} == {n: c.macs for n, c in b.costs.items()}
    assert a.params_total == b.params_total and a.flops_total == b.flops_total
    assert a.blockers == b.blockers


def test_one_trace_serves_plan_importance_counts_and_apply_hands_the_graph_over():
    model, x = warmed_up(M.resnet18(num_classes=10), (2, 3, 32, 32)), torch.randn(1, 3, 32, 32)
    start = CG.traces[0]
    g = channel_graph(model, x)
    p = plan(model, 0.4, example_inputs=x)
    plan(model, target_flops=0.6, example_inputs=x)
    plan_from_keep(model, {p.groups[0].name: torch.arange(3)}, example_inputs=x)
    channel_importance(model, x)
    find_channel_groups(model, x)
    assert count_flops(model, x) == g.flops_total == _hook_flops(model, x)
    assert CG.traces[0] - start == 1 and channel_graph(model, x) is g

    pruned = apply(model, p)
    handed = channel_graph(pruned, x)
    assert CG.traces[0] - start == 1  # the pruned copy got the narrowed graph, no trace
    assert handed.flops_total == p.flops[1] == _hook_flops(pruned, x) and handed.params_total == count_params(pruned)
    CG.forget(pruned)
    _same_graph(handed, channel_graph(pruned, x))  # equal to a fresh trace of the pruned model

    apply(model, p, inplace=True)
    assert channel_graph(model, x).flops_total == p.flops[1] == _hook_flops(model, x)
    assert CG.traces[0] - start == 2


def test_a_model_changed_behind_the_cache_is_traced_again():
    model, x = M.vgg_small(widths=(8, 8, 16)), torch.randn(1, 3, 16, 16)
    g = channel_graph(model, x)
    model.features[0] = nn.Conv2d(3, 8, 3, padding=1)  # same shapes, another module
    assert channel_graph(model, x) is not g
    big = torch.randn(1, 3, 32, 32)  # another input size: another graph, both cached
    assert channel_graph(model, big).flops_total == _hook_flops(model, big) > channel_graph(model, x).flops_total
    assert channel_graph(model, big) is channel_graph(model, big)


def test_inplace_apply_leaves_no_stale_gradient_accumulator():
    model = M.vgg_small(widths=(8, 8, 16)).train()
    x = torch.randn(4, 3, 16, 16)
    loss = model(x).square().mean()
    loss.backward()  # the graph of this loss stays alive, as the last batch's in a loop
    apply(model, plan(model, 0.5, example_inputs=x[:1]), inplace=True)
    model.zero_grad()
    model(x).square().mean().backward()  # failed with "expected shape" before the fix
    assert all(p.grad is None or p.grad.shape == p.shape for p in model.parameters())
    assert loss.grad_fn is not None


class GroupedBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 -> grouped 3x3 (4 groups of 4) -> 1x1, around a residual."""

    def __init__(self, bn=BoundedBatchNorm2d):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), bn(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), bn(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), bn(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(F.adaptive_avg_pool2d(F.relu(x + self.bn3(self.conv3(y))), 1).flatten(1))


@pytest.mark.parametrize("bn", [BoundedBatchNorm2d, nn.BatchNorm2d])
def test_grouped_convolution_loses_whole_groups_exactly(bn):
    model, x = warmed_up(GroupedBlock(bn), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8)
    (g,) = [g for g in find_channel_groups(model, x) if g.name == "bn1"]
    assert g.bns == ["bn1", "bn2"] and g.depthwise == ["conv2"] and g.unit == 4
    p = plan(model, 0.5, scope="local", min_channels=1, example_inputs=x)
    kept = p.group_keep["bn1"]
    assert 0 < len(kept) < 16 and len(kept) % 4 == 0
    assert torch.equal(kept.reshape(-1, 4) % 4, torch.arange(4).expand(len(kept) // 4, 4))  # whole groups
    pruned = apply(model, p)
    assert pruned.conv2.groups == len(kept) // 4 and pruned.conv2.weight.shape[1] == 4
    assert_same_function(pruned, masked_copy(model, p.keep), x)
    assert p.flops[1] == _hook_flops(pruned, x) < p.flops[0]


class SE(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class GatedNet(nn.Module):
    def __init__(self, bn=BoundedBatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1, bias=False), bn(12)
        self.se = SE(12, 4)
        self.conv2, self.bn2 = nn.Conv2d(12, 6, 1, bias=False), bn(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.se(F.relu(self.bn1(self.conv1(x))))
        return self.head(F.relu(self.bn2(self.conv2(y))).mean((2, 3)))


def test_squeeze_and_excitation_gate_is_coupled_with_the_gated_channels():
    model, x = warmed_up(GatedNet(), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8)
    (g,) = [g for g in find_channel_groups(model, x) if g.name == "bn1"]
    assert g.gates == ["se.expand"] and sorted(c.name for c in g.consumers) == ["conv2", "se.reduce"]
    p = plan(model, 0.5, scope="local", example_inputs=x)
    pruned = apply(model, p)
    assert pruned.se.expand.out_channels == pruned.se.reduce.in_channels == len(p.group_keep["bn1"]) < 12
    assert_same_function(pruned, masked_copy(model, p.keep), x)  # bounded, no bias: the removed channels are 0
    assert p.flops[1] == _hook_flops(pruned, x) and not p.inexact_folds


def test_a_non_zero_constant_through_a_gate_is_reported_not_silently_folded():
    model, x = warmed_up(GatedNet(nn.BatchNorm2d), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn1.bias.uniform_(0.5, 1.0)  # removed channels output relu(beta) > 0, then gated
    assert "conv2" in plan(model, 0.5, scope="local", example_inputs=x).inexact_folds
    with pytest.raises(ValueError, match="through gates.*conv2"):
        plan(model, 0.5, scope="local", example_inputs=x, fold="refuse")


class BatchNormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d subclass whose forward also applies drop and act."""

    def __init__(self, c, act=nn.SiLU):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), act()

    def forward(self, x):
        return self.act(self.drop(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                               self.training, 0.1, self.eps)))


class MyLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MyConv(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class NormActNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1, self.bn1 = MyConv(3, 10, 3, bias=False), norm(10)
        self.conv2, self.bn2 = nn.Conv2d(10, 8, 1, bias=False), norm(8)
        self.head = MyLinear(8 * 4 * 4, 4)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))).flatten(1))


@pytest.mark.parametrize("norm", [BatchNormAct, lambda c: BoundedBatchNormAct2d(c, bias=True, act=nn.SiLU())],
                         ids=["timm_like", "bounded"])
def test_norm_activation_layers_and_layer_subclasses_prune_exactly_and_count(norm):
    model, x = warmed_up(NormActNet(norm), (2, 3, 4, 4)), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.bias.uniform_(-1, 1)  # the removed channels' constant SiLU(beta) is folded exactly
    assert [g.name for g in find_channel_groups(model, x)] == ["bn1", "bn2"]
    p = plan(model, 0.5, scope="local", example_inputs=x)
    pruned = apply(model, p)
    assert_same_function(pruned, masked_copy(model, p.keep), x)
    assert sum(isinstance(m, nn.SiLU) for m in pruned.modules()) == 2  # the activations stay
    assert p.flops[0] == _hook_flops(model, x) and p.flops[1] == _hook_flops(pruned, x)  # MyLinear/MyConv counted


class Residual(nn.Module):
    """Most of the FLOPs in convs around residual additions: only the stem's group is prunable."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 1, bias=False), BoundedBatchNorm2d(16)
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(3))
        self.bns = nn.ModuleList(BoundedBatchNorm2d(16) for _ in range(3))

    def forward(self, x):
        x = self.bn0(self.stem(x))
        for conv, bn in zip(self.convs, self.bns):
            x = x + bn(conv(x))
        return x.mean((2, 3))


def test_a_plan_that_barely_changes_the_network_warns_naming_what_blocks_it():
    model, x = Residual(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="no prunable BatchNorm2d.*residual addition"):
        plan(model, 0.5, example_inputs=x)
    model, x = GroupedBlock(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan(model, 0.5, example_inputs=x)  # cuts enough: no warning
    assert 0 < p.prunable_flops < 1 and p.achieved_flops < 0.9
    assert any("residual addition" in b.construct for b in p.blockers) and "prunable:" in str(p)
    with pytest.warns(UserWarning, match=r"keeps 100.0% of the FLOPs.*kept whole: .*residual addition"):
        plan(model, 0.02, scope="local", min_channels=1, example_inputs=x)  # rounds to nothing removed


def test_switching_between_train_and_eval_mode_traces_each_mode_once():
    model, x = M.vgg_small(widths=(8, 8, 16)), torch.randn(1, 3, 16, 16)
    start = CG.traces[0]
    for _ in range(3):
        model.train()
        train_graph = channel_graph(model, x)
        model.eval()
        eval_graph = channel_graph(model, x)
    assert CG.traces[0] - start == 2 and train_graph is not eval_graph
    apply(model, plan(model, 0.5, example_inputs=x), inplace=True)  # both handed over narrowed
    model.train()
    assert channel_graph(model, x).flops_total == _hook_flops(model, x) and CG.traces[0] - start == 2


class Separable(nn.Module):
    """conv -> BN -> act -> depthwise (no BN of its own) -> pointwise -> BN: a separable conv (VoVNet-DW)."""

    def __init__(self, padding):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=padding, groups=10)
        self.pw, self.bn2 = nn.Conv2d(10, 6, 1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.pw(self.dw(F.relu(self.bn1(self.conv1(x)))))).mean((2, 3))


def test_a_separable_conv_passes_the_group_through_its_depthwise_filter():
    model, x = warmed_up(Separable(padding=0), (2, 3, 8, 8)), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn1.bias.uniform_(0.2, 1.0)  # removed channels output relu(beta) > 0: folded through dw into pw
    (g,) = [g for g in find_channel_groups(model, x) if g.name == "bn1"]
    assert g.depthwise == ["dw"] and [c.name for c in g.consumers] == ["pw"]
    p = plan(model, 0.5, scope="local", example_inputs=x, fold="refuse")  # unpadded: the fold is exact
    pruned = apply(model, p)
    assert pruned.dw.groups == pruned.dw.out_channels == pruned.pw.in_channels == len(p.group_keep["bn1"]) < 10
    assert_same_function(pruned, masked_copy(model, p.keep), x)
    assert p.flops[1] == _hook_flops(pruned, x)
    padded = warmed_up(Separable(padding=1), (2, 3, 8, 8))
    with torch.no_grad():
        padded.bn1.bias.uniform_(0.2, 1.0)
    assert plan(padded, 0.5, scope="local", example_inputs=x).inexact_folds == ["pw"]
