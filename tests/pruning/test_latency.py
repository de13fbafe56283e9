"""LatencyTable: build with a deterministic fake timer, predict, save/reload, refuse foreign tables."""

import itertools
import json

import pytest
import torch
from torch import nn

from pruning_helpers import fake_timer
from rnip_ext import BoundedBatchNorm2d
from rnip_ext.pruning import apply, plan, plan_from_keep
from rnip_ext.pruning.latency import LatencyTable, WallClockTimer, grid_widths
from rnip_ext.pruning.latency_plan import plan_to_latency
from rnip_ext.pruning.rounding import allowed_widths, keep_best


class Net(nn.Module):
    """Two prunable groups into a conv and a linear layer after a flatten, and a depthwise pair."""

    def __init__(self, a=8, b=12, c=6):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, a, 3, padding=1, bias=False), BoundedBatchNorm2d(a)
        self.dw, self.n2 = nn.Conv2d(a, a, 3, padding=1, groups=a, bias=False), BoundedBatchNorm2d(a)
        self.c2, self.n3 = nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), BoundedBatchNorm2d(b)
        self.c3, self.n4 = nn.Conv2d(b, c, 1, bias=False), BoundedBatchNorm2d(c)
        self.fc = nn.Linear(c * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.n2(self.dw(torch.relu(self.n1(self.c1(x))))))
        x = torch.relu(self.n3(self.c2(x)))
        return self.fc(torch.relu(self.n4(self.c3(x))).flatten(1))


def _net():
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features) * 2)
    return net


def _pruned(net, x, widths):
    scores = {g.name: s for g, s in zip(*_groups_scores(net, x))}
    keep = {g: keep_best(scores[g], w) for g, w in widths.items()}
    return apply(net, plan_from_keep(net, keep, example_inputs=x))


def _groups_scores(net, x):
    p = plan_from_keep(net, {}, example_inputs=x)
    return p.groups, [p.scores[g.name] for g in p.groups]


@pytest.fixture
def table_and_net():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    return LatencyTable.build(net, x, points=3, min_channels=2, timer=fake_timer, progress=False), net, x


def test_grid_widths():
    assert grid_widths(64, 3, 8, 3) == [8, 40, 64]  # allowed[0], allowed[round(3.5)], allowed[7]
    assert grid_widths(20, 9, 8, 3) == [8, 16, 20]  # fewer allowed widths than points: all
    assert grid_widths(10, 2, 1, 3) == [3, 10]


def test_prediction_matches_the_pruned_network(table_and_net):
    table, net, x = table_and_net
    assert set(table.channels) == {"n1", "n3", "n4"}  # n2 joins n1's group through the depthwise conv
    assert table.full == pytest.approx(fake_timer(net, (x,)), rel=1e-12)
    assert table.predict() == pytest.approx(table.full, rel=1e-12)
    # The fake time is bilinear in (input, output) widths, so interpolation is exact off the grid too.
    for widths in [{"n1": 2, "n3": 12, "n4": 6}, {"n1": 5, "n3": 7, "n4": 3}, {"n1": 8, "n3": 2, "n4": 5}]:
        small = _pruned(net, x, widths)
        assert table.predict(widths) == pytest.approx(fake_timer(small, (x,)), rel=1e-9)
    err = table.interpolation_error
    assert err is not None and err["points"] > 0 and err["max"] < 1e-9
    with pytest.raises(ValueError, match="outside the measured widths"):
        table.predict({"n1": 1})
    with pytest.raises(ValueError, match="does not have"):
        table.predict({"nope": 3})


def test_save_reload_and_refusals(table_and_net, tmp_path):
    table, net, x = table_and_net
    path = tmp_path / "lat.json"
    table.save(path)
    again = LatencyTable.load(path, net, x)
    widths = {"n1": 4, "n3": 9, "n4": 2}
    assert again.predict(widths) == table.predict(widths)
    with pytest.raises(FileExistsError):
        table.save(path)
    table.save(path, overwrite=True)
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="not a latency table"):
        table.save(other, overwrite=True)
    assert json.loads(other.read_text()) == {"mine": 1}  # untouched
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.load(other)

    with pytest.raises(ValueError, match="inputs"):  # another batch size
        LatencyTable.load(path, net, torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="groups"):  # another network
        LatencyTable.load(path, Net(b=16).eval(), x)
    with pytest.raises(ValueError, match="layout"):
        LatencyTable.load(path, net, x, layout="channels_last")
    with pytest.raises(ValueError, match="dtype"):
        LatencyTable.load(path, _net().double(), x.double())
    data = json.loads(path.read_text())
    data["key"]["torch"] = "1.0.0"
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="torch is '1.0.0' in the table"):
        LatencyTable.load(stale, net, x)
    data["latency_table"] = 99
    stale.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format 99"):
        LatencyTable.load(stale)


def test_wall_clock_timer_with_a_fake_clock():
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three timed calls: 1, 3 and 2 seconds
    calls = []
    timer = WallClockTimer(warmup=2, repeats=3, clock=lambda: next(ticks))
    assert timer(lambda x: calls.append(x), (7,)) == 2.0
    assert calls == [7] * 5
    with pytest.raises(ValueError, match="repeats"):
        WallClockTimer(repeats=0)


def test_build_refuses_bad_settings():
    net, x = _net(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="layout"):
        LatencyTable.build(net, x, layout="nhwc", timer=fake_timer)
    with pytest.raises(ValueError, match="points"):
        LatencyTable.build(net, x, points=1, timer=fake_timer)
    with pytest.raises(ValueError, match="round_to"):
        LatencyTable.build(net, x, round_to=0, timer=fake_timer)
    with pytest.raises(ValueError, match="no prunable"):
        LatencyTable.build(nn.Sequential(nn.Conv2d(3, 4, 1)), x, timer=fake_timer)


def _table_and_scores(round_to, min_channels):
    """A 4-point table of a fresh tiny net (fake clock), its group scores by name, the net and an input."""
    net, x = _net(), torch.randn(1, 3, 8, 8)
    table = LatencyTable.build(net, x, points=4, round_to=round_to, min_channels=min_channels, timer=fake_timer,
                               progress=False)
    groups, scores = _groups_scores(net, x)
    return table, {g.name: s for g, s in zip(groups, scores)}, net, x


def test_select_against_brute_force_on_the_tiny_network():
    table, scores, net, x = _table_and_scores(round_to=2, min_channels=2)
    names = list(table.channels)
    combos = list(itertools.product(*[allowed_widths(table.channels[g], 2, 2) for g in names]))
    for fraction in (0.9, 0.6, 0.4):
        budget = fraction * table.full
        sel = table.select(scores, budget, round_to=2, min_channels=2)
        measured = fake_timer(_pruned(net, x, sel.widths), (x,))
        assert measured == pytest.approx(sel.cost, rel=1e-9) and measured <= budget * (1 + 1e-12)
        best = max(sum(torch.sort(scores[g], descending=True).values[:w].sum().item() for g, w in zip(names, ws))
                   for ws in combos if table.predict(dict(zip(names, ws))) <= budget)
        assert sel.importance <= best + 1e-6
        assert sel.importance >= 0.9 * best  # a coupled cost: no bound, but never far off here
    with pytest.raises(ValueError, match="measured down to"):
        table.select(scores, 0.5 * table.full, round_to=1, min_channels=1)


def test_select_threshold_keeps_the_channels_above_the_lowest_threshold_that_fits():
    table, scores, _, _ = _table_and_scores(round_to=1, min_channels=1)
    every = sorted({float(v) for s in scores.values() for v in s.double().tolist()}) + [float("inf")]

    def widths_at(t):  # brute force: count the channels at or above t, at least one
        return {g: max(1, int((s.double() >= t).sum())) for g, s in scores.items()}

    for fraction in (1.0, 0.7, 0.45):
        budget = fraction * table.full
        sel = table.select_threshold(scores, budget, round_to=1, min_channels=1)
        fits = [t for t in every if table.predict(widths_at(t)) <= budget]
        assert sel.widths == widths_at(fits[0])  # the lowest threshold whose widths fit
        assert sel.cost == pytest.approx(table.predict(sel.widths), rel=1e-12) and sel.cost <= budget
        assert sel.importance == pytest.approx(sum(float(scores[g].double().sort(descending=True).values[:w].sum())
                                                   for g, w in sel.widths.items()), rel=1e-12)
    assert table.select_threshold(scores, table.full, round_to=1, min_channels=1).widths == table.channels
    with pytest.raises(ValueError, match="cannot be met"):
        table.select_threshold(scores, 0.01 * table.full, round_to=1, min_channels=1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="budget must be a finite number"):
            table.select_threshold(scores, bad, round_to=1, min_channels=1)


def test_select_threshold_keeps_allowed_widths_within_the_budget():
    table, scores, _, _ = _table_and_scores(round_to=2, min_channels=2)
    for fraction in (0.8, 0.5):
        sel = table.select_threshold(scores, fraction * table.full, round_to=2, min_channels=2)
        assert sel.cost <= fraction * table.full
        for g, w in sel.widths.items():
            assert w in allowed_widths(table.channels[g], 2, 2)


@pytest.fixture(scope="module")
def rounded_table():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    return LatencyTable.build(net, x, points=4, round_to=2, min_channels=2, timer=fake_timer, progress=False), net, x


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_plan_to_target_latency_with_a_fake_clock(target, rounded_table):
    table, net, x = rounded_table
    p = plan_to_latency(net, example_inputs=x, target_latency=target, latency_table=table, round_to=2, min_channels=2,
                        timer=fake_timer)
    small = apply(net, p)
    measured = fake_timer(small, (x,))
    assert p.latency[0] == pytest.approx(table.full, rel=1e-12)
    assert measured == pytest.approx(p.latency[1], rel=1e-9) and measured <= target * table.full * (1 + 1e-12)
    assert p.latency[2] == pytest.approx(measured, rel=1e-9)
    for g in p.groups:
        kept = len(p.group_keep[g.name])
        assert kept == g.channels or (kept % 2 == 0 and kept >= 2)
    assert torch.equal(p.keep.get("n1", torch.arange(8)), p.keep.get("n2", torch.arange(8)))  # coupled alike
    # Further down from the narrowed network, to an absolute limit: never wider than it is.
    q = plan_to_latency(small, example_inputs=x, max_latency=0.8 * measured, latency_table=table, round_to=2,
                        min_channels=2, timer=fake_timer)
    for g in q.groups:
        assert len(q.group_keep[g.name]) <= g.channels
    assert fake_timer(apply(small, q), (x,)) <= 0.8 * measured * (1 + 1e-12)


def test_plan_with_the_threshold_rule_meets_the_budget_in_score_order(rounded_table):
    table, net, x = rounded_table
    p = plan_to_latency(net, example_inputs=x, target_latency=0.5, latency_table=table, round_to=2, min_channels=2,
                        timer=fake_timer, rule="threshold")
    measured = fake_timer(apply(net, p), (x,))
    assert measured <= 0.5 * table.full * (1 + 1e-12) and p.latency[2] == pytest.approx(measured, rel=1e-9)
    assert p.latency_rule == "threshold" and "target_latency=0.5 requested (threshold)" in str(p)
    widths = {g.name: len(p.group_keep[g.name]) for g in p.groups}
    assert widths == table.select_threshold(p.scores, 0.5 * table.full, round_to=2, min_channels=2).widths
    knapsack = plan_to_latency(net, example_inputs=x, target_latency=0.5, latency_table=table, round_to=2,
                               min_channels=2, timer=fake_timer)
    assert {g.name: len(knapsack.group_keep[g.name]) for g in p.groups} != widths  # the rules differ here
    # plan() passes the rule on (its refining timings are real ones: only the kind of widths is checked).
    q = plan(net, target_latency=0.5, latency_table=table, round_to=2, min_channels=2, example_inputs=x,
             latency_rule="threshold")
    q_widths = {g.name: len(q.group_keep[g.name]) for g in q.groups}
    assert q_widths == table.select_threshold(q.scores, q.latency[1], round_to=2, min_channels=2).widths
    with pytest.raises(ValueError, match="rule must be one of"):
        plan_to_latency(net, example_inputs=x, target_latency=0.5, latency_table=table, round_to=2, min_channels=2,
                        rule="greedy")
    with pytest.raises(ValueError, match="latency_rule go with"):
        plan(net, 0.3, example_inputs=x, latency_rule="threshold")


def test_latency_budget_errors():
    net, x = _net(), torch.randn(1, 3, 8, 8)
    table = LatencyTable.build(net, x, points=2, min_channels=2, timer=fake_timer, progress=False)
    for kwargs, match in [({}, "exactly one"), ({"target_latency": 0.5, "max_latency": 1.0}, "exactly one"),
                          ({"target_latency": 0.0}, "target_latency must"), ({"target_latency": 1.5}, "target_latency"),
                          ({"max_latency": -1.0}, "max_latency must"), ({"max_latency": float("nan")}, "max_latency"),
                          ({"target_latency": 0.01}, "cannot be met")]:
        with pytest.raises(ValueError, match=match):
            plan_to_latency(net, example_inputs=x, latency_table=table, min_channels=2, timer=fake_timer, **kwargs)
    with pytest.raises(TypeError, match="latency_table"):
        plan_to_latency(net, example_inputs=x, target_latency=0.5, latency_table={"a": 1})
    with pytest.raises(ValueError, match="does not fit"):
        plan_to_latency(Net(a=10).eval(), example_inputs=x, target_latency=0.5, latency_table=table, min_channels=2)


def test_refine_corrects_a_table_that_mispredicts():
    """The device is slower on wide layers than the table says (time ** 1.3): measuring the
    pruned network and re-planning brings it from far below the target to just under it."""
    net, x = Net(16, 16, 8).eval(), torch.randn(2, 3, 8, 8)
    table = LatencyTable.build(net, x, points=5, round_to=2, min_channels=2, timer=fake_timer, progress=False)

    def device(module, inputs):
        return fake_timer(module, inputs) ** 1.3

    full = device(net, (x,))
    fractions = {}
    for refine in (0, 2):
        p = plan_to_latency(net, example_inputs=x, target_latency=0.5, latency_table=table, round_to=2,
                            min_channels=2, refine=refine, timer=device)
        fractions[refine] = device(apply(net, p), (x,)) / full
        if refine:
            assert p.latency[2] == pytest.approx(table.full * fractions[refine], rel=1e-9)
    assert fractions[0] < 0.45  # the table alone overshoots: 0.5 ** 1.3 = 0.41
    assert fractions[0] < fractions[2] <= 0.5


def test_channels_last_layout_is_timed_and_keyed():
    net, x = _net(), torch.randn(1, 3, 8, 8)
    layouts = []

    def timer(module, inputs):
        if inputs[0].dim() == 4:
            layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
        return fake_timer(module, inputs)

    table = LatencyTable.build(net, x, points=2, min_channels=2, layout="channels_last", timer=timer, progress=False)
    assert layouts and all(layouts) and table.key["layout"] == "channels_last"
    assert table.predict() == pytest.approx(table.full, rel=1e-12)
    assert all(p.is_contiguous() for p in net.parameters())  # the model is handed back as it came
    table.validate(net, x, layout="channels_last")
    with pytest.raises(ValueError, match="layout"):
        table.validate(net, x)
