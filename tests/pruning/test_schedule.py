"""RecedingSchedule: receded channels (importance < threshold) leave between epochs, the
optimiser and the regulariser follow the narrower model."""

import math

import pytest
import torch
import torch.nn.functional as F

from rnip_ext import L1Regularizer, RecedingRegularizer, param_groups
from rnip_ext import models as M
from rnip_ext.pruning import RecedingSchedule, channel_importance, count_flops

X0 = torch.randn(1, 3, 16, 16)


def _logit(p):
    return math.log(p) - math.log1p(-p)


def _model():
    """features.1: channels 2 and 5 receded relative to the layer (sigmoid 1e-4 vs 0.5);
    features.4: every channel at sigmoid ~1e-3, spread by at most 2x (a whole layer receded
    together: nothing is removable there); features.8 (not renormalised): channels 0, 1 at 0.005."""
    model = M.vgg_small(widths=(8, 12, 16)).train()
    with torch.no_grad():
        w1 = torch.zeros(8)
        w1[[2, 5]] = _logit(1e-4)
        model.features[1].weight.copy_(w1)
        model.features[4].weight.copy_(torch.tensor([_logit(1e-3 * (1 + i / 11)) for i in range(12)]))
        w8 = torch.randn(16).abs() + 1.0
        w8[[0, 1]] = _logit(0.005)
        model.features[8].weight.copy_(w8)
        model(torch.randn(8, 3, 16, 16))  # running statistics
    return model


def test_step_removes_exactly_the_channels_below_the_threshold_and_carries_everything_over():
    model = _model()
    opt = torch.optim.SGD(param_groups(model, lr=0.01), momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(10, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    reg = RecedingRegularizer(model, 1e-3, 1.0)
    schedule = RecedingSchedule(X0)
    flops_before = count_flops(model, X0)
    with torch.no_grad():
        model.eval()
        y_before = model(x)
        model.train()

    step = schedule.step(0, model, opt, reg)

    assert set(step.removed) == {"features.1", "features.8"}  # features.4 receded as a whole: kept
    assert torch.equal(step.removed["features.1"], torch.tensor([2, 5]))
    assert torch.equal(step.removed["features.8"], torch.tensor([0, 1]))
    assert step.n_removed == 4 and step.epoch == 0 and step.optimizer is opt
    new = step.model
    assert new is not model and model.features[1].num_features == 8  # the input is untouched
    assert [new.features[i].num_features for i in (1, 4, 8)] == [6, 12, 14]
    assert step.plan.flops == (flops_before, count_flops(new, X0))
    assert schedule.original_flops == flops_before
    # Optimiser and regulariser follow the new model.
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in new.parameters()}
    assert opt.state[new.features[1].weight]["momentum_buffer"].shape == (6,)
    assert [id(m) for m in reg.layers] == [id(new.features[i]) for i in (1, 4, 8)]
    # The channels that left carried under 1% of their layer's signal: eval output barely moves.
    with torch.no_grad():
        new.eval()
        y_after = new(x)
    torch.testing.assert_close(y_after, y_before, rtol=0, atol=2e-2 * y_before.abs().max().item())
    # Training goes on; nothing else is below the threshold, so the next step removes nothing.
    new.train()
    F.cross_entropy(new(x), y).backward()
    opt.step()
    again = schedule.step(1, new, opt, reg)
    assert again.removed == {} and again.model is new and again.plan is None


def test_min_channels_keeps_the_best_scored():
    model = _model()
    with torch.no_grad():
        model.features[1].weight.copy_(torch.tensor([0.0] + [_logit(1e-4 * (i + 1)) for i in range(7)]))
    step = RecedingSchedule(X0, min_channels=3).step(0, model)
    # Channel 0 is the top; of the receded ones, 7 and 6 are the best.
    kept = sorted(set(range(8)) - set(step.removed["features.1"].tolist()))
    assert kept == [0, 6, 7]
    scores = channel_importance(step.model)["features.1"]
    assert len(scores) == 3


def test_not_due_epochs_and_paper_score():
    model = _model()
    schedule = RecedingSchedule(X0, every=2, start=1)
    assert [schedule.due(e) for e in range(5)] == [False, True, False, True, False]
    step = schedule.step(0, model)
    assert step.removed == {} and step.model is model
    # With the paper's absolute score the whole receded layer features.4 would go to min_channels.
    paper = RecedingSchedule(X0, score="paper").step(0, model)
    assert paper.model.features[4].num_features == 3


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.1, float("nan"), True, "0.01"])
def test_threshold_outside_open_unit_interval(threshold):
    with pytest.raises(ValueError, match="threshold must be a number in"):
        RecedingSchedule(X0, threshold=threshold)


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_channels"):
        RecedingSchedule(X0, min_channels=0)
    with pytest.raises(ValueError, match="every"):
        RecedingSchedule(X0, every=0)
    with pytest.raises(ValueError, match="example_inputs"):
        RecedingSchedule(None)
    with pytest.raises(ValueError, match="score"):
        RecedingSchedule(X0, score="abs")
    model = M.vgg_small(widths=(8, 12, 16), bn="plain")
    with pytest.raises(TypeError, match="no rebind"):
        RecedingSchedule(X0).step(0, model, regularizer=L1Regularizer(model))
