"""round_to widths and the knapsack width selection, against brute force on tiny instances."""

import itertools
import random

import pytest
import torch

from rnip_ext.pruning.knapsack import select_widths
from rnip_ext.pruning.rounding import allowed_widths, check_round_to, keep_best, round_width


@pytest.mark.parametrize("channels,round_to,min_channels,expected", [
    (20, 8, 3, [8, 16, 20]),
    (16, 8, 3, [8, 16]),
    (7, 8, 3, [7]),          # narrower than round_to: all or nothing, so all
    (10, 1, 3, list(range(3, 11))),
    (24, 8, 9, [16, 24]),    # min_channels rounds up to a multiple
    (5, 4, 9, [5]),          # min_channels above the width: whole
])
def test_allowed_widths(channels, round_to, min_channels, expected):
    assert allowed_widths(channels, round_to, min_channels) == expected


@pytest.mark.parametrize("channels,round_to,min_channels", [(37, 8, 3), (64, 16, 1), (13, 4, 5), (9, 1, 2)])
def test_round_width_nearest_allowed_and_monotone(channels, round_to, min_channels):
    allowed = allowed_widths(channels, round_to, min_channels)
    previous = 0
    for count in range(0, channels + 3):
        w = round_width(count, channels, round_to, min_channels)
        assert w in allowed
        assert abs(w - min(max(count, allowed[0]), channels)) == min(
            abs(a - min(max(count, allowed[0]), channels)) for a in allowed)
        assert w >= previous
        previous = w


@pytest.mark.parametrize("bad", [0, -8, 2.0, True, "8"])
def test_bad_round_to(bad):
    with pytest.raises(ValueError, match="round_to"):
        check_round_to(bad)
    with pytest.raises(ValueError, match="round_to"):
        allowed_widths(16, bad)


def test_keep_best_by_score_ties_like_the_removal_order():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.3])
    assert keep_best(scores, 2).tolist() == [2, 3]  # of the tied 0.5s the later one stays
    assert keep_best(scores, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="width"):
        keep_best(scores, 0)


def _brute_force(channels, scores, terms, budget, constant, round_to, min_channels):
    names = list(channels)
    best = None
    for ws in itertools.product(*[allowed_widths(channels[g], round_to, min_channels) for g in names]):
        widths = dict(zip(names, ws))
        cost = constant + sum(fn(*[widths[n] for n in ns]) for ns, fn in terms)
        if cost > budget:
            continue
        value = sum(torch.sort(scores[g].double(), descending=True).values[:widths[g]].sum().item() for g in names)
        if best is None or value > best[0]:
            best = (value, widths)
    return best


def _instance(rng, coupled):
    n = rng.randint(2, 3)
    channels = {f"g{i}": rng.randint(3, 9) for i in range(n)}
    scores = {g: torch.rand(c, generator=torch.Generator().manual_seed(rng.randrange(2**31))) for g, c in channels.items()}
    terms = []
    for g in channels:  # per-group time: a per-call overhead plus a slope, sometimes a staircase
        a, b, step = rng.uniform(0.1, 1), rng.uniform(0.1, 2), rng.choice([1, 1, 4])
        terms.append(((g,), lambda w, a=a, b=b, step=step: a + b * step * -(-w // step)))
    if coupled:
        names = list(channels)
        for x, y in zip(names, names[1:]):  # a conv between two groups: in * out
            c = rng.uniform(0.01, 0.1)
            terms.append(((x, y), lambda u, v, c=c: c * u * v))
    return channels, scores, terms


@pytest.mark.parametrize("coupled", [False, True])
def test_select_widths_against_brute_force(coupled):
    rng = random.Random(torch.initial_seed())
    optimal, ratios = 0, []
    for _ in range(40):
        channels, scores, terms = _instance(rng, coupled)
        round_to, min_channels = rng.choice([1, 2, 4]), rng.choice([1, 2])
        full = sum(fn(*[channels[n] for n in ns]) for ns, fn in terms)
        budget = full * rng.uniform(0.3, 0.95)
        best = _brute_force(channels, scores, terms, budget, 0.0, round_to, min_channels)
        if best is None:
            with pytest.raises(ValueError, match="cannot be met"):
                select_widths(channels, scores, terms, budget, round_to=round_to, min_channels=min_channels)
            continue
        sel = select_widths(channels, scores, terms, budget, round_to=round_to, min_channels=min_channels)
        for g, w in sel.widths.items():
            assert w in allowed_widths(channels[g], round_to, min_channels)
        recomputed = sum(fn(*[sel.widths[n] for n in ns]) for ns, fn in terms)
        assert sel.cost == pytest.approx(recomputed, rel=1e-12) and sel.cost <= budget
        assert sel.importance <= best[0] + 1e-9
        if not coupled:  # the LP bound of the module docstring
            assert best[0] <= sel.importance + sel.gap_bound + 1e-9
        optimal += sel.importance >= best[0] - 1e-9
        ratios.append(sel.importance / best[0])
    # Not a guarantee, a regression guard: on 600 such instances (seed 123) the greedy found the
    # optimum on 89% and kept 99.6% of the optimum's importance on average, 88% at worst.
    assert optimal >= len(ratios) // 2 and sum(ratios) / len(ratios) >= 0.98


def test_select_widths_keeps_everything_within_budget_and_refuses_the_impossible():
    channels = {"a": 8, "b": 8}
    scores = {g: torch.rand(8) for g in channels}
    terms = [(("a",), lambda w: float(w)), (("b",), lambda w: 2.0 * w)]
    sel = select_widths(channels, scores, terms, 24.0)
    assert sel.widths == channels and sel.gap_bound == 0 and sel.steps == 0
    with pytest.raises(ValueError, match="cannot be met"):
        select_widths(channels, scores, terms, 5.0, min_channels=3)  # 3 + 6 at the narrowest
    with pytest.raises(ValueError, match="scores for group"):
        select_widths(channels, {"a": torch.rand(8), "b": torch.rand(7)}, terms, 24.0)
    with pytest.raises(ValueError, match="not given"):
        select_widths(channels, scores, [(("c",), float)], 24.0)


class _CoupledNet(torch.nn.Module):
    """A conv group coupled through a depthwise conv, a plain group and a flattened linear consumer."""

    def __init__(self):
        super().__init__()
        from rnip_ext import BoundedBatchNorm2d

        nn = torch.nn
        self.c1, self.b1 = nn.Conv2d(3, 21, 3, padding=1, bias=False), BoundedBatchNorm2d(21)
        self.dw, self.b2 = nn.Conv2d(21, 21, 3, padding=1, groups=21, bias=False), BoundedBatchNorm2d(21)
        self.c2, self.b3 = nn.Conv2d(21, 30, 3, stride=2, padding=1, bias=False), BoundedBatchNorm2d(30)
        self.c3, self.b4 = nn.Conv2d(30, 13, 1, bias=False), BoundedBatchNorm2d(13)
        self.fc = nn.Linear(13 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.b2(self.dw(torch.relu(self.b1(self.c1(x))))))
        x = torch.relu(self.b4(self.c3(torch.relu(self.b3(self.c2(x))))))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"ratio": 0.3, "scope": "local"}, {"target_flops": 0.4},
                                    {"target_flops": 0.5, "scope": "local"}, {"target_params": 0.35}])
def test_plan_round_to(budget):
    from rnip_ext import BoundedBatchNorm2d
    from rnip_ext.pruning import apply, count_flops, plan

    net = _CoupledNet().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features) * 2)
    x = torch.randn(1, 3, 8, 8)
    p = plan(net, example_inputs=x, round_to=4, **budget)
    assert p.round_to == 4 and "round_to=4" in str(p)
    assert any(len(p.group_keep[g.name]) < g.channels for g in p.groups)
    for g in p.groups:
        kept = p.group_keep[g.name]
        assert len(kept) == g.channels or (len(kept) % 4 == 0 and len(kept) >= 4)
        assert torch.equal(kept, keep_best(p.scores[g.name], len(kept)))  # the best-scored channels
    assert torch.equal(p.keep["b1"], p.keep["b2"])  # coupled through the depthwise conv
    small = apply(net, p)
    if "target_flops" in budget:
        assert count_flops(small, x) <= budget["target_flops"] * count_flops(net, x)
    if "target_params" in budget:
        assert p.achieved_params <= budget["target_params"]
    with pytest.raises(ValueError, match="round_to"):
        plan(net, example_inputs=x, round_to=0, **budget)


def test_plan_latency_arguments_refused():
    from rnip_ext.pruning import plan

    net, x = _CoupledNet().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="exactly one budget"):
        plan(net, example_inputs=x, target_latency=0.5, target_flops=0.5)
    with pytest.raises(ValueError, match="scope must be 'global'"):
        plan(net, example_inputs=x, target_latency=0.5, scope="local")
    with pytest.raises(ValueError, match="latency_table and latency_rule go with"):
        plan(net, 0.5, example_inputs=x, latency_table="t.json")
