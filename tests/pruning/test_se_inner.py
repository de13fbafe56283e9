"""The inner width of squeeze-and-excitation blocks, pruned on its own: ``plan(..., se_ratio=...)``.

References: the original network with the removed inner channels' activations set to 0 (a forward
hook on the SE activation, or zeroed ``expand`` weight columns for the zoo models), in float64 for
the hand-made net; an independent loop for the scores; FLOPs and parameters counted on the pruned
network; the plan of today (``se_ratio`` not given) for the default.
"""

import copy
import math

import pytest
import torch
from torch import nn

import zoo_models
from pruning_helpers import assert_same_function, masked_copy, warmed_up, zero_removed, zoo_prepared
from rnip_ext import BoundedBatchNorm2d
from rnip_ext import models as M
from rnip_ext.pruning import (apply, channel_graph, count_flops, count_params, load, plan, plan_from_keep,
                              plan_receded, prune, save)
from rnip_ext.pruning import channels as CG
from rnip_ext.pruning.se import se_scores


class SE(nn.Module):
    def __init__(self, c, r, bias=True):
        super().__init__()
        self.reduce, self.act, self.expand = nn.Conv2d(c, r, 1, bias=bias), nn.ReLU(), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class SENet(nn.Module):
    """conv -> bounded BN -> ReLU -> SE (12 -> 8 -> 12) -> conv -> BN -> pool -> linear."""

    def __init__(self, inner=8, bias=True):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 12, 3, padding=1, bias=False), BoundedBatchNorm2d(12)
        self.se = SE(12, inner, bias)
        self.conv2, self.bn2 = nn.Conv2d(12, 6, 1, bias=False), BoundedBatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.se(torch.relu(self.bn1(self.conv1(x))))
        return self.head(torch.relu(self.bn2(self.conv2(y))).mean((2, 3)))


def se_net(inner=8, bias=True):
    torch.manual_seed(0)
    return warmed_up(SENet(inner, bias), (2, 3, 8, 8))


def inner_masked(model, se_keep, names=None):
    """A copy whose SE activations output 0 on the removed inner channels (forward hooks)."""
    masked = copy.deepcopy(model)
    for block, kept in se_keep.items():
        act = masked.get_submodule((names or {}).get(block, block.rsplit(".", 1)[0] + ".act"))
        removed = torch.ones(act_width(masked, block), dtype=torch.bool)
        removed[kept] = False
        act.register_forward_hook(lambda m, i, out, removed=removed: out.masked_fill(removed.view(1, -1, 1, 1), 0.0))
    return masked


def act_width(model, block):
    return model.get_submodule(block).out_channels


def test_the_se_block_is_found_and_its_inner_width_pruned_exactly_in_float64():
    model, x = se_net().double(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    p = plan(model, 0.0, example_inputs=x, se_ratio=0.5)
    assert [(b.reduce, b.expand, b.channels) for b in p.se_blocks] == [("se.reduce", "se.expand", 8)]
    assert not p.keep and list(p.se_keep) == ["se.reduce"] and len(p.se_keep["se.reduce"]) == 4
    pruned = apply(model, p)
    assert pruned.se.reduce.weight.shape == (4, 12, 1, 1) and pruned.se.reduce.bias.shape == (4,)
    assert pruned.se.expand.weight.shape == (12, 4, 1, 1) and pruned.se.expand.in_channels == 4
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want, got = inner_masked(model, p.se_keep)(x), pruned(x)
        full = model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(full, want)  # the masking did change something: the reference is not trivial
    assert p.flops == (count_flops(model, x), count_flops(pruned, x)) and p.flops[1] < p.flops[0]
    assert p.params == (count_params(model), count_params(pruned))


@pytest.mark.parametrize("bias", [True, False])
def test_both_dimensions_of_the_reduce_conv_are_sliced_with_the_gated_group(bias):
    model, x = se_net(bias=bias), torch.randn(2, 3, 8, 8)
    p = plan(model, 0.4, scope="local", example_inputs=x, se_ratio=0.25)
    kept_bn, kept_se = len(p.group_keep["bn1"]), len(p.se_keep["se.reduce"])
    assert kept_bn < 12 and kept_se == 6
    pruned = apply(model, p)
    assert pruned.se.reduce.weight.shape == (kept_se, kept_bn, 1, 1)  # inputs: gated group; outputs: own
    assert pruned.se.expand.weight.shape == (kept_bn, kept_se, 1, 1)  # outputs: gate; inputs: own
    reference = inner_masked(masked_copy(model, p.keep), p.se_keep)  # bounded BNs: removed channels are 0
    assert_same_function(pruned, reference, x)
    assert p.flops[1] == count_flops(pruned, x) and p.params[1] == count_params(pruned)


def test_a_bias_folded_into_a_bias_less_reduce_conv_is_sliced_with_its_outputs():
    """Plain BatchNorms with shifts: the removed gated channels' constant mean is folded into the
    reduce conv, which has no bias: the new bias has the pruned SE width; the gate itself is exact."""
    torch.manual_seed(0)
    model = SENet(bias=False)
    model.bn1, model.bn2 = nn.BatchNorm2d(12), nn.BatchNorm2d(6)
    model = warmed_up(model, (2, 3, 8, 8))
    with torch.no_grad():
        model.bn1.bias.uniform_(0.5, 1.0)
    x = torch.randn(2, 3, 8, 8)
    p = plan(model, 0.4, scope="local", example_inputs=x, se_ratio=0.5)
    pruned = apply(model, p)
    assert pruned.se.reduce.bias.shape == (4,) and model.se.reduce.bias is None
    assert p.params[1] == count_params(pruned) and p.flops[1] == count_flops(pruned, x)
    handed = channel_graph(pruned, x)
    CG.forget(pruned)
    assert handed.param_shapes == channel_graph(pruned, x).param_shapes
    reference = inner_masked(masked_copy(model, p.keep), p.se_keep)  # scales 0: the shifts stay, as in pruning
    gates = []
    for net in (pruned, reference):
        hook = net.se.expand.register_forward_hook(lambda m, i, out: gates.append(out))
        with torch.no_grad():
            net(x)
        hook.remove()
    torch.testing.assert_close(gates[0], gates[1][:, p.group_keep["bn1"]], rtol=1e-5, atol=1e-5)


def test_scores_are_the_gain_through_the_bottleneck_and_the_lowest_go_block_by_block():
    model, x = se_net(inner=10), torch.randn(2, 3, 8, 8)
    w_r, w_e = model.se.reduce.weight.detach().double(), model.se.expand.weight.detach().double()
    expected = torch.tensor([math.sqrt(float((w_r[c] ** 2).sum())) * math.sqrt(float((w_e[:, c] ** 2).sum()))
                             for c in range(10)], dtype=torch.float64)
    (block,) = channel_graph(model, x).se_blocks
    torch.testing.assert_close(se_scores(model, [block])["se.reduce"], expected)
    p = plan(model, 0.0, example_inputs=x, se_ratio=0.35)  # floor(3.5) = 3 go
    assert torch.equal(p.se_keep["se.reduce"], torch.sort(torch.argsort(expected)[3:]).values)
    # the plan's own per-layer minimum: min(min_channels, width) kept
    assert len(plan(model, 0.0, example_inputs=x, se_ratio=0.95).se_keep["se.reduce"]) == 3
    assert len(plan(model, 0.0, min_channels=1, example_inputs=x, se_ratio=0.95).se_keep["se.reduce"]) == 1


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None, True, float("nan")])
def test_a_bad_se_ratio_is_a_value_error_naming_it(bad):
    model, x = se_net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="se_ratio must be a float in"):
        plan(model, 0.3, example_inputs=x, se_ratio=bad)
    with pytest.raises(ValueError, match="se_ratio"):
        plan_receded(model, example_inputs=x, se_ratio=bad)


def test_se_ratio_with_a_latency_budget_is_refused_before_any_timing():
    model, x = se_net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="se_ratio is not supported with a latency budget"):
        plan(model, target_latency=0.5, example_inputs=x, se_ratio=0.5)


def _same_plan(a, b):
    assert a.keep.keys() == b.keep.keys() and all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep)
    assert all(torch.equal(a.group_keep[k], b.group_keep[k]) for k in a.group_keep)
    assert (a.flops, a.params, a.signature, a.achieved_ratio, a.threshold) == \
        (b.flops, b.params, b.signature, b.achieved_ratio, b.threshold)
    assert str(a) == str(b) and not a.se_keep and not b.se_keep


def test_default_se_ratio_gives_todays_plan():
    model, x = se_net(), torch.randn(1, 3, 8, 8)
    _same_plan(plan(model, 0.4, example_inputs=x), plan(model, 0.4, example_inputs=x, se_ratio=0.0))
    _same_plan(plan(model, target_flops=0.7, example_inputs=x),
               plan(model, target_flops=0.7, example_inputs=x, se_ratio=0))
    p = plan(model, 0.4, example_inputs=x)
    assert "SE" not in str(p)
    pruned = apply(model, p)
    assert pruned.se.reduce.out_channels == 8 == pruned.se.expand.in_channels


def test_a_budget_counts_the_se_removal_and_is_met_exactly():
    model, x = se_net(), torch.randn(1, 3, 8, 8)
    p = plan(model, target_flops=0.75, example_inputs=x, se_ratio=0.5)
    p0 = plan(model, target_flops=0.75, example_inputs=x)
    assert p.achieved_flops <= 0.75 and len(p.se_keep["se.reduce"]) == 4
    pruned = apply(model, p)
    assert p.flops[1] == count_flops(pruned, x) and p.params[1] == count_params(pruned)
    # the SE channels' share of the budget lets the groups keep at least as much as without them
    assert sum(len(k) for k in p.group_keep.values()) >= sum(len(k) for k in p0.group_keep.values())
    q = plan(model, target_params=0.6, example_inputs=x, se_ratio=0.5)
    assert q.achieved_params <= 0.6 and q.params[1] == count_params(apply(model, q))


def test_print_inplace_optimizer_and_the_handed_over_graph():
    model, x = se_net(), torch.randn(2, 3, 8, 8)
    p = plan(model, 0.3, example_inputs=x, se_ratio=0.5)
    text = str(p)
    assert "se_ratio=0.5" in text and "se.reduce (SE)" in text and "8 -> 4" in text
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).square().sum().backward()
    opt.step()
    reference = inner_masked(masked_copy(model, p.keep), p.se_keep)
    apply(model, p, opt, inplace=True)
    assert model.se.expand.weight.shape[1] == 4 == opt.state[model.se.reduce.bias]["momentum_buffer"].shape[0]
    assert opt.state[model.se.expand.weight]["momentum_buffer"].shape == model.se.expand.weight.shape
    assert_same_function(model, reference, x)
    handed = channel_graph(model, x)
    assert [(b.name, b.channels) for b in handed.se_blocks] == [("se.reduce", 4)]
    assert handed.flops_total == p.flops[1] and handed.params_total == count_params(model)
    CG.forget(model)
    fresh = channel_graph(model, x)
    assert fresh.se_blocks == handed.se_blocks and fresh.flops_total == handed.flops_total


def test_prune_plan_from_keep_plan_receded_and_save_load(tmp_path):
    model, x = se_net(), torch.randn(2, 3, 8, 8)
    small = prune(model, 0.3, example_inputs=x, se_ratio=0.5)
    assert small.se.reduce.out_channels == 4
    path = tmp_path / "small.pt"
    save(small, path)
    loaded = load(path, model=SENet())
    assert loaded.se.expand.in_channels == 4
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)

    explicit = plan_from_keep(model, {}, example_inputs=x, se_keep={"se.reduce": [0, 2, 5]})
    assert torch.equal(explicit.se_keep["se.reduce"], torch.tensor([0, 2, 5]))
    assert apply(model, explicit).se.expand.weight.shape == (12, 3, 1, 1)
    with pytest.raises(ValueError, match="'conv1', which are not squeeze-and-excitation blocks.*se.reduce"):
        plan_from_keep(model, {}, example_inputs=x, se_keep={"conv1": [0]})
    with pytest.raises(ValueError, match="outside"):
        plan_from_keep(model, {}, example_inputs=x, se_keep={"se.reduce": [8]})

    assert plan_receded(model, example_inputs=x, threshold=1e-6) is None  # nothing has receded
    r = plan_receded(model, example_inputs=x, threshold=1e-6, se_ratio=0.5)
    assert r is not None and not r.keep and len(r.se_keep["se.reduce"]) == 4 and r.se_ratio == 0.5


class NotSE(nn.Module):
    """Look-alikes that must not be taken for SE blocks: the bottleneck read twice, a sum instead of
    a product, a 3x3 'expand'."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), BoundedBatchNorm2d(8)
        self.r1, self.e1 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.r2, self.e2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.r3, self.e3 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        s = torch.relu(self.r1(x.mean((2, 3), keepdim=True)))
        x = x * torch.sigmoid(self.e1(s)) + s.mean()  # the inner tensor has another reader
        x = x + torch.sigmoid(self.e2(torch.relu(self.r2(x.mean((2, 3), keepdim=True)))))  # not a gate
        return x * torch.sigmoid(self.e3(torch.relu(self.r3(x.mean((2, 3), keepdim=True)))))  # 3x3


def test_look_alikes_and_plain_networks_have_no_se_blocks():
    x = torch.randn(1, 3, 8, 8)
    assert channel_graph(NotSE().eval(), x).se_blocks == []
    resnet = warmed_up(M.resnet18(num_classes=10), (2, 3, 32, 32))
    assert channel_graph(resnet, torch.randn(1, 3, 32, 32)).se_blocks == []


# Zoo models with SE blocks: every SE module is found; the pruned network equals the original with
# the removed BN channels' scales and shifts and the removed inner channels' expand columns zeroed.
SE_CLASSES = ("SqueezeExcite", "SqueezeExcitation", "SEModule")
ZOO = [("timm", "mobilenetv3_large_100"), ("timm", "regnety_002"), ("torchvision", "efficientnet_b0"),
       ("torchvision", "mobilenet_v3_large")]


@pytest.mark.parametrize("source,name", [pytest.param(s, n, id=f"{s}-{n}") for s, n in ZOO])
def test_zoo_se_blocks_are_found_and_pruned_exactly(source, name):
    if (zoo_models.torchvision_models() if source == "torchvision" else zoo_models.timm_module()) is None:
        pytest.skip(reason=f"{source} is not installed (optional test dependency)")
    model = zoo_prepared(source, name)
    x = torch.randn(*zoo_models.input_size(name))
    expected = sum(type(m).__name__ in SE_CLASSES for m in model.modules())
    p = plan(model, 0.3, example_inputs=x, se_ratio=0.5)
    assert expected > 0 and len(p.se_blocks) == expected == len(p.se_keep)
    zero_removed(model, p.keep, scales=False)  # nothing left to fold: the comparison is exact
    p = plan(model, 0.3, example_inputs=x, se_ratio=0.5)
    pruned = apply(model, p)
    masked = copy.deepcopy(model)
    zero_removed(masked, p.keep, scales=True)
    with torch.no_grad():
        for b in p.se_blocks:
            removed = torch.ones(b.channels, dtype=torch.bool)
            removed[p.se_keep[b.name]] = False
            masked.get_submodule(b.expand).weight[:, removed] = 0.0
            assert pruned.get_submodule(b.reduce).out_channels == b.channels - int(removed.sum())
    x = torch.randn(*zoo_models.input_size(name))
    with torch.no_grad():
        got, want = pruned(x), masked(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert p.flops == (count_flops(model, x), count_flops(pruned, x))
    assert p.params == (count_params(model), count_params(pruned))
    base = plan(model, 0.3, example_inputs=x)
    assert p.flops[1] < base.flops[1] and p.params[1] < base.params[1]


# round_to: every SE inner width a multiple of it or whole, rounded *up* from what se_ratio removes.

def _expected_se_width(width, se_ratio, round_to, min_channels=3):
    """Independent of se.py: the count se_ratio keeps, then the first multiple of round_to at or
    above it (and at or above min(min_channels, width)), or the whole width."""
    keep = max(width - math.floor(se_ratio * width + 1e-9), min(min_channels, width))
    up = -(-keep // round_to) * round_to
    return up if up < width else width


@pytest.mark.parametrize("inner,se_ratio,min_channels", [(20, 0.5, 3), (20, 0.3, 3), (20, 0.1, 3), (20, 0.95, 3),
                                                         (20, 0.95, 1), (8, 0.5, 3), (13, 0.6, 3)])
def test_round_to_rounds_the_se_width_up_keeping_the_best_scored_and_stays_exact(inner, se_ratio, min_channels):
    model, x = se_net(inner=inner).double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    p = plan(model, 0.0, min_channels=min_channels, example_inputs=x, se_ratio=se_ratio, round_to=8)
    width = _expected_se_width(inner, se_ratio, 8, min_channels)
    assert width % 8 == 0 or width == inner
    if width == inner:  # rounding up to the whole width: the block keeps everything
        assert not p.se_keep
        return
    w_r, w_e = model.se.reduce.weight.detach(), model.se.expand.weight.detach()
    scores = w_r.flatten(1).norm(dim=1) * w_e.flatten(1).norm(dim=0)  # expand's input columns
    expected = torch.sort(torch.argsort(scores, stable=True)[inner - width:]).values
    assert torch.equal(p.se_keep["se.reduce"], expected)
    pruned = apply(model, p)
    assert pruned.se.reduce.out_channels == width == pruned.se.expand.in_channels
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), inner_masked(model, p.se_keep)(x), rtol=1e-12, atol=1e-12)
    # without round_to: exactly floor(se_ratio * inner) go (what rounding started from)
    plain = plan(model, 0.0, min_channels=min_channels, example_inputs=x, se_ratio=se_ratio)
    assert len(plain.se_keep["se.reduce"]) == max(inner - math.floor(se_ratio * inner + 1e-9), min(min_channels, inner))
    assert set(plain.se_keep["se.reduce"].tolist()) <= set(p.se_keep["se.reduce"].tolist())


@pytest.mark.parametrize("budget", [{"target_flops": 0.6}, {"target_flops": 0.7, "scope": "local"},
                                    {"target_params": 0.6}])
def test_round_to_with_se_ratio_meets_the_budget_and_rounds_every_width(budget):
    model, x = se_net(inner=20), torch.randn(1, 3, 8, 8)
    p = plan(model, example_inputs=x, se_ratio=0.5, round_to=4, **budget)
    assert len(p.se_keep["se.reduce"]) == 12  # 20 - 10 = 10, up to 12
    for g in p.groups:
        kept = len(p.group_keep[g.name])
        assert kept == g.channels or kept % 4 == 0
    pruned = apply(model, p)
    kind, target = next((k, v) for k, v in budget.items() if k.startswith("target_"))
    assert p.flops[1] == count_flops(pruned, x) and p.params[1] == count_params(pruned)
    reached = p.achieved_flops if kind == "target_flops" else p.achieved_params
    assert reached <= target
    reference = inner_masked(masked_copy(model, p.keep), p.se_keep)
    assert_same_function(pruned, reference, torch.randn(2, 3, 8, 8))
    # plan_receded rounds the SE width up alike
    r = plan_receded(model, example_inputs=x, threshold=1e-6, se_ratio=0.5, round_to=4)
    assert len(r.se_keep["se.reduce"]) == 12


def test_zoo_round_to_keeps_every_se_width_a_multiple_or_whole_and_meets_the_budget():
    if zoo_models.timm_module() is None:
        pytest.skip(reason="timm is not installed (optional test dependency)")
    model = zoo_prepared("timm", "efficientnet_b0")  # SE widths 8, 4, 6, 10, 20, 28, 48, 80: not all multiples of 8
    x = torch.randn(*zoo_models.input_size("efficientnet_b0"))
    p = plan(model, target_flops=0.6, example_inputs=x, se_ratio=0.5, round_to=8)
    assert p.achieved_flops <= 0.6
    widths = {b.name: (b.channels, len(p.se_keep.get(b.name, range(b.channels)))) for b in p.se_blocks}
    assert len(widths) == sum(type(m).__name__ == "SqueezeExcite" for m in model.modules()) > 0
    assert any(w < c for c, w in widths.values()) and any(w == c for c, w in widths.values())
    for c, w in widths.values():
        assert w == _expected_se_width(c, 0.5, 8)
    zero_removed(model, p.keep, scales=False)  # nothing left to fold: the comparison is exact
    p = plan(model, target_flops=0.6, example_inputs=x, se_ratio=0.5, round_to=8)
    pruned = apply(model, p)
    for b in p.se_blocks:
        assert pruned.get_submodule(b.reduce).out_channels == widths[b.name][1]
    masked = copy.deepcopy(model)
    zero_removed(masked, p.keep, scales=True)
    with torch.no_grad():
        for b in p.se_blocks:
            if b.name in p.se_keep:
                removed = torch.ones(b.channels, dtype=torch.bool)
                removed[p.se_keep[b.name]] = False
                masked.get_submodule(b.expand).weight[:, removed] = 0.0
        x = torch.randn(*zoo_models.input_size("efficientnet_b0"))
        got, want = pruned(x), masked(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert p.flops[1] == count_flops(pruned, x) and count_flops(pruned, x) <= 0.6 * count_flops(model, x)
