"""Channel importance that means "removable": invariant to a renormalised layer's common scale."""

import copy
import math

import pytest
import torch

from rnip_ext import models as M
from rnip_ext.pruning import channel_importance, find_channel_groups, plan
from rnip_ext.pruning.importance import bn_scores, group_scores

A = 1e-3  # every sigmoid(w) of the moved layer is multiplied by this


def _model(eps_next=1e-5):
    """vgg_small in float64: features.1 feeds conv features.3 -> BatchNorm features.4 (renormalised)."""
    model = M.vgg_small(widths=(8, 12, 16)).double()
    model.features[4].eps = eps_next
    with torch.no_grad():
        for i in (1, 4, 8):
            model.features[i].weight.normal_()
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16, dtype=torch.float64))
    return model


def _moved(model, a=A):
    """A copy whose features.1 logits give exactly ``a * sigmoid(w)``: w' = logit(a * sigmoid(w))."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        w = moved.features[1].weight
        s = torch.sigmoid(w)
        w.copy_(math.log(a) + torch.nn.functional.logsigmoid(w) - torch.log1p(-a * s))
    ratio = torch.sigmoid(moved.features[1].weight) / torch.sigmoid(model.features[1].weight)
    torch.testing.assert_close(ratio, torch.full_like(ratio, a), rtol=1e-12, atol=0)
    return moved


@torch.no_grad()
def _reestimate(model, batches):
    """Running statistics re-estimated from scratch (cumulative average over ``batches``)."""
    for m in model.modules():
        if hasattr(m, "reset_running_stats") and hasattr(m, "momentum"):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for x in batches:
        model(x)
    return model.eval()


def test_renormalised_flag_on_groups():
    groups = find_channel_groups(M.vgg_small(widths=(8, 12, 16)))
    assert [(g.name, g.renormalised) for g in groups] == [
        ("features.1", True), ("features.4", True), ("features.8", False)  # the last feeds pool + linear
    ]


def test_common_scale_moves_in_train_mode_change_only_through_eps():
    # Exactly true: scaling the layer by a is the same as eps -> eps / a**2 in the next BatchNorm.
    model = _model()
    moved = _moved(model)
    reference = copy.deepcopy(model)
    reference.features[4].eps = model.features[4].eps / A**2
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y_moved, y_ref = moved.train()(x), reference.train()(x)
    torch.testing.assert_close(y_moved, y_ref, rtol=1e-9, atol=1e-9 * y_ref.abs().max().item())


def test_eval_output_unchanged_after_the_running_statistics_are_reestimated():
    # With an eps negligible against the conv output's variance even after the 1e-3 move
    # (eps / a**2 = 1e-6 against a variance ~0.1), the function is unchanged to 1e-5 relative;
    # in eval the renormalising BatchNorm's running statistics are stale (they were measured at
    # the old scale) and must be re-estimated, after which the outputs agree again.
    model = _model(eps_next=1e-12)
    moved = _moved(model)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = model.eval()(x)
        stale = moved.eval()(x)
    assert (stale - y).abs().max() > 0.1 * y.abs().max()  # stale statistics: a different function
    calibration = [torch.randn(16, 3, 16, 16, dtype=torch.float64) for _ in range(3)]
    _reestimate(model, calibration), _reestimate(moved, calibration)
    with torch.no_grad():
        y, y_moved = model(x), moved(x)
    torch.testing.assert_close(y_moved, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.mark.parametrize("scope", ["global", "local"])
def test_plan_keeps_exactly_the_same_channels_after_the_move(scope):
    model = _model()
    moved = _moved(model)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    before = plan(model, 0.5, scope, min_channels=1, example_inputs=x)
    after = plan(moved, 0.5, scope, min_channels=1, example_inputs=x)
    for name in before.group_keep:
        assert torch.equal(before.group_keep[name], after.group_keep[name]), name
    scores_before, scores_after = channel_importance(model), channel_importance(moved)
    for name in scores_before:
        torch.testing.assert_close(scores_after[name], scores_before[name], rtol=1e-6, atol=0)
    if scope == "global":
        # The paper's absolute score would empty the moved layer down to min_channels.
        assert channel_importance(moved, score="paper")["features.1"].max() < 2 * A
        assert len(after.group_keep["features.1"]) > 1


def test_relative_and_paper_scores_are_what_the_docstring_says():
    model = _model()
    groups = find_channel_groups(model)
    relative, paper = channel_importance(model), channel_importance(model, score="paper")
    for i in (1, 4, 8):
        s = torch.sigmoid(model.features[i].weight.detach()).float()
        torch.testing.assert_close(paper[f"features.{i}"], s)
        expected = s / s.max() if i != 8 else s  # features.8 is not renormalised
        torch.testing.assert_close(relative[f"features.{i}"], expected)
        assert relative[f"features.{i}"].max() == 1.0 or i == 8
    by_group = group_scores(model, groups, score="paper")
    torch.testing.assert_close(by_group["features.4"], paper["features.4"])
    assert plan(model, 0.3, example_inputs=torch.randn(1, 3, 16, 16, dtype=torch.float64)).scores.keys() == by_group.keys()
    # Logits so low that every sigmoid underflows in float32: the relative score stays finite.
    with torch.no_grad():
        model.features[1].weight.copy_(torch.linspace(-200, -190, 8))
    r = channel_importance(model)["features.1"]
    assert paper_underflows(model) and r.max() == 1.0
    torch.testing.assert_close(r, torch.exp(torch.linspace(-200, -190, 8) + 190))


def paper_underflows(model):
    return bool((channel_importance(model, score="paper")["features.1"] == 0).all())


def test_plain_batchnorm_scores():
    model = M.vgg_small(widths=(8, 12, 16), bn="plain")
    with torch.no_grad():
        model.features[1].weight.normal_()
        model.features[4].weight.zero_()
    relative, paper = channel_importance(model), channel_importance(model, score="paper")
    g = model.features[1].weight.detach().abs()
    torch.testing.assert_close(paper["features.1"], g)
    torch.testing.assert_close(relative["features.1"], g / g.max())
    assert torch.equal(relative["features.4"], torch.zeros(12))  # all-zero layer: no 0/0
    torch.testing.assert_close(relative["features.8"], model.features[8].weight.detach().abs())
    assert torch.equal(bn_scores(model.features[1]), g)  # without graph knowledge: the paper's score


def test_bad_score():
    model = M.vgg_small(widths=(8, 12, 16))
    with pytest.raises(ValueError, match="score must be one of"):
        channel_importance(model, score="absolute")
    with pytest.raises(ValueError, match="score must be one of"):
        group_scores(model, find_channel_groups(model), score="sigmoid")
