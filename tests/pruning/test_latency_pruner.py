"""BudgetPruner with a latency budget (fake timer: deterministic) and with round_to."""

import pytest
import torch

from budget_helpers import X0, loader, own_net, train_interval
from pruning_helpers import fake_timer
from rnip_ext import BudgetPruner, pruning
from rnip_ext.pruning.latency import LatencyTable

# A 4-epoch run cuts ahead of receding: the lag warning is expected and not the subject here.
pytestmark = pytest.mark.filterwarnings("ignore::rnip_ext.pruner.RecedingLagWarning")


def _run(epochs=4, **budget):
    model = own_net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = loader(0)
    pruner = BudgetPruner(model, X0, epochs=epochs, optimizer=opt, **budget)
    for _ in range(epochs):
        train_interval(model, data, opt, pruner)
        pruner.step(opt)
    return model, pruner


def _widths(model):
    return {g.name: g.channels for g in pruning.find_channel_groups(model, X0)}


@pytest.mark.parametrize("budget", [{"target_latency": 0.4}, {"max_latency": "0.5 of full"}])
def test_budget_pruner_to_a_latency_budget(budget):
    base = own_net(0)
    table = LatencyTable.build(base, X0, points=4, round_to=2, min_channels=2, timer=fake_timer, progress=False)
    if "max_latency" in budget:
        budget = {"max_latency": 0.5 * table.full}
        fraction = 0.5
    else:
        fraction = budget["target_latency"]
    model, pruner = _run(latency_table=table, round_to=2, min_channels=2, **budget)
    assert pruner.cost == "latency" and pruner.target == pytest.approx(fraction)
    assert pruner.done and pruner.within_budget
    measured = fake_timer(model, (X0,))
    assert measured == pytest.approx(table.predict(_widths(model)), rel=1e-9)
    assert measured <= fraction * table.full * (1 + 1e-9)
    full = _widths(base)
    for g, w in _widths(model).items():
        assert w == full[g] or w % 2 == 0
    assert pruner.history[-1].fraction == pytest.approx(measured / table.full, rel=1e-9)


def test_budget_pruner_with_the_threshold_rule():
    base = own_net(0)
    table = LatencyTable.build(base, X0, points=4, round_to=2, min_channels=2, timer=fake_timer, progress=False)
    model, pruner = _run(latency_table=table, round_to=2, min_channels=2, target_latency=0.4, latency_rule="threshold")
    assert pruner.done and pruner.within_budget and pruner.latency_rule == "threshold"
    assert fake_timer(model, (X0,)) <= 0.4 * table.full * (1 + 1e-9)
    saved = pruner.state_dict()  # a knapsack pruner does not continue a threshold pruner's run
    fresh = own_net(0)
    other = BudgetPruner(fresh, X0, epochs=4, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-2),
                         target_latency=0.4, latency_table=table, round_to=2, min_channels=2)
    with pytest.raises(ValueError, match="latency_rule: 'threshold' vs 'knapsack'"):
        other.load_state_dict(saved)
    with pytest.raises(ValueError, match="latency_rule must be one of"):
        BudgetPruner(own_net(0), X0, epochs=4, target_latency=0.4, latency_table=table, latency_rule="nope")
    with pytest.raises(ValueError, match="latency_rule go with"):
        BudgetPruner(own_net(0), X0, epochs=4, target_flops=0.4, latency_rule="threshold")


def test_budget_pruner_round_to_with_a_flops_budget():
    model, pruner = _run(target_flops=0.3, round_to=4)
    assert pruner.done and pruning.count_flops(model, X0) <= 0.3 * pruner.original_flops
    full = _widths(own_net(0))
    for g, w in _widths(model).items():
        assert w == full[g] or w % 4 == 0, (g, w)
    assert pruner.state_dict()["settings"]["round_to"] == 4


def test_budget_pruner_latency_errors():
    with pytest.raises(ValueError, match="exactly one budget"):
        BudgetPruner(own_net(0), X0, target_latency=0.5, target_flops=0.5, epochs=4)
    with pytest.raises(ValueError, match="target_latency must"):
        BudgetPruner(own_net(0), X0, target_latency=1.5, epochs=4)
    with pytest.raises(ValueError, match="round_to"):
        BudgetPruner(own_net(0), X0, target_flops=0.5, epochs=4, round_to=0)
