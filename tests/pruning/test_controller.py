"""BudgetController on synthetic sequences, and active_flops."""

import random

import pytest
import torch

from rnip_ext import models as M
from rnip_ext.pruning import BudgetController, RecedingSchedule, active_flops, count_flops


def test_schedule_is_linear_from_start_to_by_epoch():
    c = BudgetController(0.1, by_epoch=12, start_epoch=2)
    assert [c.target_at(e) for e in (0, 2, 7, 12, 20)] == pytest.approx([1.0, 1.0, 0.55, 0.1, 0.1])


def test_one_update_follows_the_rule():
    c = BudgetController(0.2, by_epoch=8, eps=1e-3, max_increase=1.5, max_decrease=0.25, max_drop=0.2)
    # Epoch 0: nothing receded yet (f = 1), need f - f*(1) = 0.1 -> as fast as allowed.
    assert c.update(0, 1.0, 1e-3) == pytest.approx(1.5e-3)
    # Epoch 1: 0.05 receded, need 0.95 - f*(2) = 0.95 - 0.8 = 0.15 -> factor 0.151 / 0.051.
    assert c.update(1, 0.95, 1e-3) == pytest.approx(1e-3 * 0.151 / 0.051 if 0.151 / 0.051 < 1.5 else 1.5e-3)
    # Epoch 2: on schedule (0.8 -> need 0.8 - 0.7 = 0.1) after receding 0.15: factor 0.101 / 0.151.
    assert c.update(2, 0.8, 1e-3) == pytest.approx(1e-3 * 0.101 / 0.151)
    # Epoch 3: ahead of the schedule (need 0.01 after receding 0.19): cut by max_decrease.
    assert c.update(3, 0.61, 1e-3) == pytest.approx(0.25e-3)
    assert [r.epoch for r in c.history] == [0, 1, 2, 3] and not any(r.braked for r in c.history)


def test_brake_when_receding_runs_away_and_clipping():
    c = BudgetController(0.05, by_epoch=4, max_drop=0.1, brake=0.5, min_strength=1e-4, max_strength=2e-3)
    c.update(0, 0.98, 1e-3)
    # 0.3 receded in one epoch: cut although the schedule still asks for more (need > 0).
    assert c.update(1, 0.68, 1e-3) == pytest.approx(0.5e-3)
    assert c.history[-1].braked
    assert c.update(2, 0.68, 1.9e-3) == pytest.approx(2e-3)  # max_strength
    assert c.update(3, 0.01, 1.5e-4) == pytest.approx(1e-4)  # min_strength


def _closed_loop(controller, gain, epochs=30, noise=0.0, seed=0):
    """Plant: each epoch a fraction ``gain * strength`` (noisy) of the active FLOPs recedes."""
    rng = random.Random(seed)
    f, strength, trace = 1.0, 1e-3, []
    for epoch in range(epochs):
        f *= 1.0 - min(0.5, gain * strength * (1.0 + noise * rng.uniform(-1.0, 1.0)))
        strength = controller.update(epoch, f, strength)
        trace.append((f, strength))
    return trace


@pytest.mark.parametrize("gain", [2.0, 20.0, 200.0])
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_closed_loop_reaches_the_budget_without_collapse(gain, noise):
    # The plant's sensitivity spans 100x around the initial strength (gain 20 matches it).
    target = 0.1
    trace = _closed_loop(BudgetController(target, by_epoch=20), gain, noise=noise)
    active = [f for f, _ in trace]
    drops = [a - b for a, b in zip([1.0] + active, active)]
    if gain <= 20.0:
        assert target * 0.85 <= active[-1] <= target * 1.05  # reaches the budget, does not run past it
    else:  # first epoch far too strong (20% receded at once): braked, then catches up late
        assert drops[0] > 0.1 and target * 0.5 <= active[-1] <= target * 1.05
    # A runaway epoch (more than max_drop receded) is never followed by another.
    assert not any(a > 0.1 and b > 0.1 for a, b in zip(drops, drops[1:]))
    again = _closed_loop(BudgetController(target, by_epoch=20), gain, noise=noise)
    assert again == trace  # deterministic given the inputs


def test_closed_loop_follows_the_schedule_midway():
    c = BudgetController(0.1, by_epoch=20)
    trace = _closed_loop(c, 20.0)
    for epoch in range(4, 19):
        assert abs(trace[epoch][0] - c.target_at(epoch)) < 0.02, epoch


@pytest.mark.parametrize("kwargs,match", [
    ({"target_flops": 0.0}, "target_flops"), ({"target_flops": 1.5}, "target_flops"),
    ({"by_epoch": 0}, "by_epoch"), ({"max_increase": 1.0}, "max_increase"),
    ({"max_decrease": 1.0}, "max_decrease"), ({"brake": 0.0}, "brake"),
    ({"min_strength": 1.0, "max_strength": 0.5}, "max_strength"),
])
def test_bad_arguments(kwargs, match):
    args = {"target_flops": 0.1, "by_epoch": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        BudgetController(**args)
    with pytest.raises(ValueError, match="active"):
        BudgetController(0.1, 10).update(0, 1.5, 1e-3)
    with pytest.raises(ValueError, match="strength"):
        BudgetController(0.1, 10).update(0, 0.5, float("nan"))


def test_active_flops_is_the_cost_after_the_schedule_would_remove_receded_channels():
    model = M.vgg_small(widths=(8, 12, 16))
    with torch.no_grad():
        model.features[1].weight[:3] = -12.0  # relative importance ~1e-5: receded
    x0 = torch.randn(1, 3, 16, 16)
    step = RecedingSchedule(x0).step(0, model)
    assert step.n_removed == 3
    assert active_flops(model, x0) == count_flops(step.model, x0) < count_flops(model, x0)
