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
    reg = L1Regularizer(model)
    # Every built-in regulariser can rebind now (the regulariser protocol); a bare callable cannot.
    with pytest.raises(TypeError, match="no rebind"):
        RecedingSchedule(X0).step(0, model, regularizer=lambda: reg())


# -- enforce_budget: the final cut to the FLOPs budget, by the global ranking -----------------

def _trained_step_model():
    """``_model()`` after one SGD-momentum step (so every parameter has a momentum buffer)."""
    model = _model()
    opt = torch.optim.SGD(param_groups(model, lr=0.01), momentum=0.9)
    F.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(10, (8,))).backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("target", [0.5, 0.2, 0.08])
def test_enforce_budget_after_a_threshold_step_meets_the_budget_by_the_global_ranking(target):
    from rnip_ext.pruning import plan_from_keep
    from rnip_ext.pruning.importance import group_scores

    model, opt = _trained_step_model()
    reg = RecedingRegularizer(model, 1e-3, 1.0)
    schedule = RecedingSchedule(X0, min_channels=2)
    original = count_flops(model, X0)
    first = schedule.step(0, model, opt, reg)  # removes the 4 receded channels
    assert first.n_removed == 4 and schedule.original_flops == original
    mid = first.model
    assert count_flops(mid, X0) > target * original
    old_buffers = {name: opt.state[p]["momentum_buffer"].clone() for name, p in mid.named_parameters()}

    step = schedule.enforce_budget(5, mid, target, opt, reg)

    new = step.model
    after = count_flops(new, X0)
    # The budget counts against the FLOPs at the schedule's first step, not the narrowed model's.
    assert after <= target * original
    assert step.plan.flops == (count_flops(mid, X0), after)
    # Shortest prefix of the global order: the removed channels are the lowest-scored of their
    # layers' rankings, and giving back the best removed channel breaks the budget.
    groups = step.plan.groups
    scores = group_scores(mid, groups)
    removed_scores, best_back = [], None
    for g in groups:
        keep = step.plan.group_keep[g.name]
        assert len(keep) >= min(2, g.channels)
        mask = torch.ones(g.channels, dtype=torch.bool)
        mask[keep] = False
        if mask.any():
            removed_scores.append(scores[g.name][mask].max().item())
            if len(keep) > min(2, g.channels):  # not held by min_channels: kept ones outrank removed
                assert scores[g.name][keep].min() >= scores[g.name][mask].max()
            candidate = scores[g.name][mask].max().item()
            if best_back is None or candidate > best_back[0]:
                idx = mask.nonzero().flatten()[scores[g.name][mask].argmax()]
                best_back = (candidate, g.name, int(idx))
    assert removed_scores, "the budget must remove something"
    _, name, idx = best_back
    back = {g.name: step.plan.group_keep[g.name] for g in groups}
    back[name] = torch.cat([back[name], torch.tensor([idx])])
    assert plan_from_keep(mid, back, example_inputs=X0).flops[1] > target * original
    # Optimiser state carried: each momentum buffer is the old one sliced with the parameter.
    assert step.optimizer is opt
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in new.parameters()}
    from rnip_ext.pruning.plan import module_slices

    slices = module_slices(groups, step.plan.group_keep)
    checked = 0
    for name, p in new.named_parameters():
        old = old_buffers.get(name)
        if old is None:  # a bias created by folding starts with no state
            assert "momentum_buffer" not in opt.state.get(p, {})
            continue
        out_idx, in_idx = slices.get(name.rsplit(".", 1)[0], [None, None])
        if out_idx is not None:
            old = old[out_idx]
        if in_idx is not None and old.dim() > 1:
            old = old[:, in_idx]
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], old, rtol=0, atol=0)
        checked += 1
    assert checked >= 8  # 3 convs, 3 BatchNorms, the linear weight and bias
    assert [id(m) for m in reg.layers] == [id(new.features[i]) for i in (1, 4, 8)]
    # Already within budget: nothing more leaves.
    again = schedule.enforce_budget(6, new, target, opt, reg)
    assert again.removed == {} and again.model is new and again.plan is None


def test_enforce_budget_without_a_previous_step_uses_the_current_flops():
    model, opt = _trained_step_model()
    schedule = RecedingSchedule(X0, min_channels=1)
    before = count_flops(model, X0)
    step = schedule.enforce_budget(0, model, 0.3, opt)
    assert count_flops(step.model, X0) <= 0.3 * before
    assert step.plan.achieved_flops <= 0.3


@pytest.mark.parametrize("target", [0, 1.5, -0.1, float("nan"), True])
def test_enforce_budget_bad_target(target):
    model, opt = _trained_step_model()
    with pytest.raises(ValueError, match="target_flops must be a fraction"):
        RecedingSchedule(X0).enforce_budget(0, model, target, opt)


def test_enforce_budget_unreachable_leaves_model_and_optimizer_unchanged():
    model, opt = _trained_step_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for g in opt.param_groups for p in g["params"]]
    with pytest.raises(ValueError, match="cannot be met"):
        RecedingSchedule(X0, min_channels=6).enforce_budget(0, model, 0.01, opt)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert params == [id(p) for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("target", [0.45, 0.15])
def test_enforce_budget_local_scope_is_the_planners_uniform_cut_against_the_original_flops(target):
    from rnip_ext.pruning import plan

    model, opt = _trained_step_model()
    schedule = RecedingSchedule(X0, min_channels=2)
    original = count_flops(model, X0)
    mid = schedule.step(0, model, opt).model  # narrower: the budget still counts against `original`
    current = count_flops(mid, X0)
    step = schedule.enforce_budget(3, mid, target, opt, scope="local")
    assert count_flops(step.model, X0) <= target * original
    # The same channels as the planner's local plan to the equivalent fraction of the current FLOPs.
    want = plan(mid, target_flops=target * original / current * (1 - 1e-12), scope="local", min_channels=2,
                example_inputs=X0)
    assert step.plan.scope == "local"
    assert {k: v.tolist() for k, v in step.plan.group_keep.items()} == {k: v.tolist() for k, v in want.group_keep.items()}
    # budget_plan changes nothing and says None once the model meets the budget.
    assert schedule.budget_plan(step.model, target, "local") is None
    with pytest.raises(ValueError, match="target_flops must be a fraction"):
        schedule.budget_plan(mid, 0.0)
