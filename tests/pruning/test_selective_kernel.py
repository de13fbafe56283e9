"""Selective kernel blocks (timm's ``SelectiveKernel``, SKNet): stacked paths pruned as one group.

A small hand-written SK block written like timm's (paths conv-BN-ReLU, ``torch.stack`` along
dim 1, the attention ``sum(1) -> mean -> fc_reduce -> BN -> ReLU -> fc_select -> view ->
softmax(dim=1)``, ``(x * a).sum(1)``, then a conv), its variants that must stay whole or
partly whole, and timm's ``skresnet18`` at 1x3x64x64. Exactness as in test_zoo.py: the pruned
network equals, in float64, the original with the removed channels' scales and shifts set to 0;
with the shifts kept the attention's reducing conv is still folded exactly (the paths' constants
summed), the softmax-weighted sum is listed as approximate.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo_models
from pruning_helpers import zero_removed
from rnip_ext.pruning import (apply, channel_graph, count_flops, count_params, find_channel_groups, plan,
                              plan_from_keep)
from rnip_ext.pruning.flops import channel_costs
from rnip_ext.pruning.importance import group_scores


class SKBlock(nn.Module):
    """stem conv-BN-ReLU, a selective kernel with ``paths`` 3x3 paths (dilation 1, 2, ...) of
    ``width`` channels, conv3x3-BN-ReLU, avgpool-flatten-linear.

    ``split``: the stem's output is split across the paths (timm's ``split_input=True``);
    ``groups``: the paths' convs are grouped (ResNeXt-style, in == out); ``identity``: the last
    path is the stem's output itself (no conv-BN of its own)."""

    def __init__(self, width=12, paths=2, split=False, groups=1, identity=False):
        super().__init__()
        self.split, self.identity, self.paths_n = split, identity, paths
        stem = width if groups > 1 or identity else 8
        self.conv0 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(stem)
        cin = stem // paths if split else stem
        self.convs = nn.ModuleList(nn.Conv2d(cin, width, 3, padding=1 + m, dilation=1 + m, groups=groups, bias=False)
                                   for m in range(paths - identity))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(paths - identity))
        self.fc_reduce = nn.Conv2d(width, 4, 1, bias=False)
        self.bn_attn = nn.BatchNorm2d(4)
        self.fc_select = nn.Conv2d(4, width * paths, 1, bias=False)
        self.conv2 = nn.Conv2d(width, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        if self.split:  # indexed, as timm does: fx cannot iterate over the split's result
            parts = torch.split(x, x.shape[1] // self.paths_n, 1)
            inputs = [parts[m] for m in range(self.paths_n)]
        else:
            inputs = [x] * self.paths_n
        xs = [F.relu(bn(conv(i))) for conv, bn, i in zip(self.convs, self.bns, inputs)]
        if self.identity:
            xs.append(x)
        s = torch.stack(xs, dim=1)
        a = s.sum(1).mean((2, 3), keepdim=True)
        a = self.fc_select(F.relu(self.bn_attn(self.fc_reduce(a))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, self.paths_n, c // self.paths_n, h, w), dim=1)
        y = torch.sum(s * a, dim=1)
        y = F.relu(self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _randomised(model, seed=0):
    """Spread scales, non-zero shifts, one batch of running statistics, eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
                m.bias.uniform_(-0.3, 0.3)
                m.momentum = None
        model.train()
        model(torch.randn(4, 3, 16, 16))
    return model.eval()


def _close64(a, b):
    a, b = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return ((ya - yb).abs().max() / yb.abs().max()).item()


X = torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("paths", [2, 3])
@pytest.mark.parametrize("residual_streams", [False, True])
def test_paths_are_one_group(paths, residual_streams):
    model = SKBlock(paths=paths).eval()
    graph = channel_graph(model, X, residual_streams=residual_streams)
    (sk,) = [g for g in graph.groups if g.name == "bns.0"]
    assert sk.bns == [f"bns.{m}" for m in range(paths)]
    assert sk.producers == [f"convs.{m}" for m in range(paths)]
    assert sk.selects == {"fc_select": paths} and sk.summed and sk.stacked and not sk.residual
    assert sorted(c.name for c in sk.consumers) == ["conv2", "fc_reduce"]
    assert sk.renormalised  # fc_reduce and conv2 each feed a BatchNorm
    assert not [b for b in graph.blockers if b.bn.startswith("bns.")]
    # The attention's own width and the stem stay prunable as before.
    assert {g.name for g in graph.groups} == {"bn0", "bns.0", "bn_attn", "bn2"}


@pytest.mark.parametrize("paths", [2, 3])
def test_pruned_equals_masked_and_counts_match(paths):
    model = _randomised(SKBlock(paths=paths))
    gen = torch.Generator().manual_seed(paths)
    keep = {"bns.0": torch.randperm(12, generator=gen)[:5].sort().values,
            "bn_attn": torch.tensor([0, 2, 3]), "bn0": torch.tensor([1, 2, 4, 5, 7])}
    zero_removed(model, {"bns.%d" % m: keep["bns.0"] for m in range(paths)} | {"bn_attn": keep["bn_attn"],
                  "bn0": keep["bn0"]}, scales=False)
    p = plan_from_keep(model, keep, example_inputs=X)
    pruned = apply(model, p)
    masked = copy.deepcopy(model)
    zero_removed(masked, p.keep)
    assert set(p.keep) >= {f"bns.{m}" for m in range(paths)}  # every path loses the same channels
    assert _close64(pruned, masked) < 1e-12
    assert pruned.fc_select.out_channels == paths * 5 and pruned.fc_reduce.in_channels == 5
    assert all(c.out_channels == 5 for c in pruned.convs) and pruned.conv2.in_channels == 5
    assert p.flops == (count_flops(model, X), count_flops(pruned, X))
    assert p.params == (count_params(model), count_params(pruned))
    assert not p.inexact_folds  # the removed shifts are 0: nothing to fold


def test_fc_select_keeps_each_paths_weights():
    """fc_select's output m * C + c (path m's weight of channel c) survives as m * kept + i."""
    model = _randomised(SKBlock(paths=3))
    keep = torch.tensor([1, 4, 6, 11])
    pruned = apply(model, plan_from_keep(model, {"bns.0": keep}, example_inputs=X))
    rows = (torch.arange(3)[:, None] * 12 + keep).flatten()
    assert torch.equal(pruned.fc_select.weight, model.fc_select.weight[rows])


def test_shifts_kept_fold_into_fc_reduce_exactly_and_report_the_weighted_sum():
    model = _randomised(SKBlock()).double()  # the fold in float64 too
    keep = torch.tensor([0, 3, 5, 8, 9])
    p = plan_from_keep(model, {"bns.0": keep}, example_inputs=X.double())
    assert p.inexact_folds == ["conv2"]  # through the softmax-weighted sum: not a constant
    with pytest.raises(ValueError, match="conv2"):
        plan_from_keep(model, {"bns.0": keep}, example_inputs=X.double(), fold="refuse")
    pruned = apply(model, p)
    masked = copy.deepcopy(model)
    zero_removed(masked, p.keep, shifts=False)  # scale 0: each removed channel outputs relu(shift)
    seen = {}
    for name, m in (("pruned", pruned), ("masked", masked)):
        m.fc_reduce.register_forward_hook(lambda mod, i, out, name=name: seen.__setitem__(name, out))
        with torch.no_grad():
            m(torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    # The attention reads mean(sum over paths): the paths' constants, summed, folded exactly.
    assert torch.allclose(seen["pruned"], seen["masked"], rtol=1e-12, atol=1e-12)
    assert pruned.fc_reduce.bias is not None


@pytest.mark.filterwarnings("ignore:this plan keeps")
def test_scored_by_the_best_path():
    """A channel goes only when it has receded in every path: the maximum over the paths."""
    model = _randomised(SKBlock())
    with torch.no_grad():
        model.bns[0].weight.fill_(0.5)
        model.bns[1].weight.fill_(0.5)
        model.bns[0].weight[[2, 7]] = 1e-3  # receded in path 0 only: still carried by path 1
        model.bns[1].weight[[2]] = 1e-3
        model.bns[1].weight[[5]] = 1e-3  # receded in path 1 only
    (sk,) = [g for g in find_channel_groups(model, X) if g.name == "bns.0"]
    scores = group_scores(model, [sk], score="paper")["bns.0"]
    assert torch.allclose(scores, torch.maximum(model.bns[0].weight.abs(), model.bns[1].weight.abs()))
    # Relative scores: channel 2 scores 0.002, every other channel of the block 1, the other
    # groups' channels at least 0.05: the lowest 5% of the 34 channels include channel 2 only here.
    p = plan(model, 0.05, example_inputs=X)
    assert p.keep["bns.0"].tolist() == [i for i in range(12) if i != 2]
    assert torch.equal(p.keep["bns.1"], p.keep["bns.0"])


def test_channel_costs_match_counted_removal():
    model = SKBlock(paths=3).eval()
    costs = channel_costs(model, X, "flops")
    p = plan_from_keep(model, {"bns.0": torch.arange(11)}, example_inputs=X)
    saved = count_flops(model, X) - count_flops(apply(model, p), X)
    assert costs["bns.0"] * 3 == pytest.approx(saved)  # shared by the three paths' BatchNorms
    costs = channel_costs(model, X, "params")
    pruned = apply(model, plan_from_keep(model, {"bns.0": torch.arange(11)}, example_inputs=X, fold="refuse"))
    assert costs["bns.0"] * 3 == pytest.approx(count_params(model) - count_params(pruned))


def test_split_input_paths_prune_the_split_blocks_the_stem():
    model = _randomised(SKBlock(split=True))
    graph = channel_graph(model, X)
    assert "bns.0" in {g.name for g in graph.groups}
    (stem,) = [b for b in graph.blockers if b.bn == "bn0"]
    assert stem.construct == "split"
    p = plan_from_keep(model, {"bns.0": torch.tensor([1, 2, 3, 10])}, example_inputs=X)
    zero_removed(model, p.keep, scales=False)
    masked = copy.deepcopy(model)
    zero_removed(masked, p.keep)
    assert _close64(apply(model, p), masked) < 1e-12


@pytest.mark.parametrize("variant,construct", [
    (dict(groups=4), "stack of paths after a depthwise/grouped convolution"),
    (dict(identity=True), "stack of paths that are not each conv (groups=1) -> BatchNorm"),
])
def test_other_stacks_stay_whole_and_are_named(variant, construct):
    model = SKBlock(**variant).eval()
    graph = channel_graph(model, X)
    assert not any(g.stacked for g in graph.groups)
    blocked = [b for b in graph.blockers if b.bn.startswith("bns.") or b.bn == "bn0"]
    assert blocked and all(b.construct.startswith(construct) for b in blocked), blocked


def test_a_stacked_product_that_is_no_path_weighting_blocks():
    class Scaled(SKBlock):
        def forward(self, x):
            x = F.relu(self.bn0(self.conv0(x)))
            s = torch.stack([F.relu(bn(conv(x))) for conv, bn in zip(self.convs, self.bns)], dim=1)
            y = (s * s).sum(1)  # not a weighting from one conv
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(y))), 1).flatten(1))

    graph = channel_graph(Scaled().eval(), X)
    assert "bns.0" not in {g.name for g in graph.groups}
    (b,) = [b for b in graph.blockers if b.bn == "bns.0"]
    assert b.construct.startswith("multiplication of stacked paths")


def test_skresnet18():
    timm = zoo_models.timm_module()
    if timm is None:
        pytest.skip(reason="timm is not installed (optional test dependency)")
    torch.manual_seed(0)
    model = _randomised(timm.create_model("skresnet18"))
    x = torch.randn(1, 3, 64, 64)
    graph = channel_graph(model, x)
    sk = [g for g in graph.groups if g.stacked]
    assert len(sk) == 8 and all(len(g.bns) == 2 and len(g.selects) == 1 for g in sk)
    assert not any("stack" in b.construct for b in graph.blockers)
    p = plan(model, 0.3, example_inputs=x)
    assert p.achieved_flops < 0.9
    zero_removed(model, p.keep, scales=False)
    p = plan(model, 0.3, example_inputs=x)
    pruned = apply(model, p)
    masked = copy.deepcopy(model)
    zero_removed(masked, p.keep)
    x2 = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ya, yb = copy.deepcopy(pruned).double()(x2), copy.deepcopy(masked).double()(x2)
    assert ((ya - yb).abs().max() / yb.abs().max()).item() < 1e-10
    assert p.flops == (count_flops(model, x), count_flops(pruned, x))
    assert p.params == (count_params(model), count_params(pruned))
    half = plan(model, target_flops=0.5, example_inputs=x)
    assert half.achieved_flops <= 0.5
