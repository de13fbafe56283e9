"""Pruning to a FLOPs or parameter budget: the shortest prefix of the global order that meets it."""

import re

import pytest
import torch
from torch import nn

from pruning_helpers import assert_same_function, masked_copy, warmed_up
import rnip_ext
from rnip_ext import models as M
from rnip_ext.pruning import apply, count_flops, count_params, plan, plan_from_keep


def flat_linear(bn="bounded"):
    """Conv-BN stack whose last group is read by a linear layer after a flatten (3x3 blocks per channel);
    the bounded BatchNorms have a shift, so removed channels fold (exactly: 1x1 and unpadded
    consumers) into bias-less consumers, which gain a bias the parameter count must include."""
    model = nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU(),
        nn.Conv2d(10, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 14, 3, bias=False), nn.BatchNorm2d(14), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(14 * 3 * 3, 5),
    )
    if bn == "bounded":
        rnip_ext.convert_batchnorm(model, bias=True)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, rnip_ext.BoundedBatchNorm2d):
                    m.bias.normal_()
    return model


MODELS = [
    ("vgg16_cifar", lambda: M.vgg16_cifar(), (2, 3, 32, 32)),
    ("resnet56_cifar", lambda: M.resnet56_cifar(), (2, 3, 32, 32)),
    ("flat_linear", flat_linear, (2, 3, 8, 8)),
    ("flat_linear_plain", lambda: flat_linear("plain"), (2, 3, 8, 8)),
]


def _key_order(p):
    """(score, global position) of every channel: the order a budget plan removes channels in."""
    keys, start = {}, 0
    for g in p.groups:
        for c, s in enumerate(p.scores[g.name].tolist()):
            keys[(g.name, c)] = (s, start + c)
        start += g.channels
    return keys


def _removed(p):
    out = []
    for g in p.groups:
        mask = torch.ones(g.channels, dtype=torch.bool)
        mask[p.group_keep[g.name]] = False
        out += [(g.name, c) for c in mask.nonzero().flatten().tolist()]
    return out


def _count(p, kind):
    return p.flops if kind == "flops" else p.params


@pytest.mark.parametrize("name,build,shape", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("kind,target,min_channels", [("flops", 0.37, 3), ("params", 0.29, 5)])
def test_budget_met_by_the_shortest_prefix(name, build, shape, kind, target, min_channels):
    model = warmed_up(build(), shape)
    x = torch.randn(*shape)
    p = plan(model, min_channels=min_channels, example_inputs=x, **{f"target_{kind}": target})
    before, after = _count(p, kind)
    assert after <= target * before
    assert getattr(p, f"target_{kind}") == target and p.ratio is None
    assert p.achieved_flops == p.flops[1] / p.flops[0] and p.achieved_params == p.params[1] / p.params[0]
    assert f"target_{kind}={target:g} requested" in str(p)

    # The plan's counts are those of the pruned network, which computes the masked original.
    pruned = apply(model, p)
    assert count_flops(pruned, x) == p.flops[1] and count_params(pruned) == p.params[1]
    assert p.flops[0] == count_flops(model, x) and p.params[0] == count_params(model)
    assert_same_function(pruned, masked_copy(model, p.keep), x)

    # The removed channels are a prefix of the global order (channels of layers at min_channels skipped) ...
    keys = _key_order(p)
    removed = _removed(p)
    last = max(removed, key=keys.get)
    by_group = {g.name: g for g in p.groups}
    for g in p.groups:
        for c in p.group_keep[g.name].tolist():
            if keys[(g.name, c)] < keys[last]:
                assert len(p.group_keep[g.name]) == min(min_channels, by_group[g.name].channels), (g.name, c)
    # ... and the shortest one: without its last channel the network misses the budget.
    keep = dict(p.group_keep)
    keep[last[0]] = torch.cat([keep[last[0]], torch.tensor([last[1]])])
    shorter = plan_from_keep(model, keep, example_inputs=x)
    assert _count(shorter, kind)[1] > target * before


def test_whole_budget_removes_nothing_and_prune_takes_targets():
    model = warmed_up(flat_linear(), (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    p = plan(model, target_flops=1.0, example_inputs=x)
    assert p.keep == {} and p.flops[0] == p.flops[1] and p.achieved_ratio == 0
    small = rnip_ext.prune(model, target_params=0.5, example_inputs=x)
    assert count_params(small) <= 0.5 * count_params(model)
    # Positional ratio calls keep working alongside the keywords.
    assert plan(model, 0.5, "global", 1, example_inputs=x).achieved_ratio == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("name,build,shape", MODELS[::2], ids=[m[0] for m in MODELS[::2]])
@pytest.mark.parametrize("kind,target", [("flops", 0.45), ("params", 0.33)])
def test_local_budget_is_the_smallest_uniform_ratio(name, build, shape, kind, target):
    model = warmed_up(build(), shape)
    x = torch.randn(*shape)
    p = plan(model, scope="local", example_inputs=x, **{f"target_{kind}": target})
    before, after = _count(p, kind)
    assert after <= target * before and p.scope == "local" and 0 < p.ratio < 1
    assert f"{p.ratio:.4f} per layer" in str(p)
    # The same channels as the local-ratio plan at that ratio, and counts of the applied network.
    same = plan(model, p.ratio, "local", example_inputs=x)
    for g in p.groups:
        assert torch.equal(same.group_keep[g.name], p.group_keep[g.name])
    pruned = apply(model, p)
    assert count_flops(pruned, x) == p.flops[1] and count_params(pruned) == p.params[1]
    # Every smaller ratio at which some layer's width changes misses the budget: the largest one below.
    smaller = max(k / g.channels for g in p.groups for k in range(g.channels) if k / g.channels < p.ratio)
    assert _count(plan(model, smaller, "local", example_inputs=x), kind)[1] > target * before


@pytest.mark.parametrize("kind", ["flops", "params"])
def test_unreachable_target_names_the_smallest_reachable_fraction(kind):
    model = warmed_up(M.resnet56_cifar(), (2, 3, 32, 32))  # residual streams cannot be pruned
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="cannot be met") as info:
        plan(model, example_inputs=x, **{f"target_{kind}": 0.01})
    smallest = float(re.search(r"keeps ([0-9.]+) of the", str(info.value)).group(1))
    assert 0.01 < smallest < 1
    # Just above it the target is met, by removing every removable channel.
    p = plan(model, example_inputs=x, **{f"target_{kind}": min(1.0, smallest + 1e-4)})
    assert abs(getattr(p, f"achieved_{kind}") - smallest) <= 1e-4
    assert all(len(k) == 3 for k in p.group_keep.values())


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of ratio, target_flops and target_params, got none"),
    ({"ratio": 0.5, "target_flops": 0.5}, "exactly one.*got ratio, target_flops"),
    ({"target_flops": 0.5, "target_params": 0.5}, "exactly one.*got target_flops, target_params"),
    ({"target_flops": 0.0}, r"target_flops must be a fraction .* in \(0, 1\], got 0.0"),
    ({"target_params": 1.01}, r"target_params must be a fraction"),
    ({"target_flops": -0.2}, r"target_flops must be a fraction"),
    ({"target_flops": float("nan")}, r"target_flops must be a fraction"),
    ({"target_flops": True}, r"target_flops must be a fraction"),
    ({"target_flops": "0.5"}, r"target_flops must be a fraction"),
    ({"target_flops": 0.5, "scope": "layer"}, "scope must be one of"),
])
def test_bad_budgets(kwargs, match):
    model = flat_linear()
    with pytest.raises(ValueError, match=match):
        plan(model, example_inputs=torch.randn(1, 3, 8, 8), **kwargs)
    with pytest.raises(ValueError, match=match):
        rnip_ext.prune(model, example_inputs=torch.randn(1, 3, 8, 8), **kwargs)
