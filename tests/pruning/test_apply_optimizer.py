"""apply(model, plan, optimizer): the optimiser follows the pruned model, state sliced with the parameters.

Reference: the unpruned model with the removed channels masked (bounded scale sigmoid(-inf) = 0).
With bias=False bounded BatchNorms the removed channels output exactly 0, so nothing needs
folding, the masked model computes the pruned model's function, and its removed parameters get
exactly zero gradient: one optimiser step on each, from the same state, must agree on every kept
parameter and state entry to fp32 rounding.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_helpers import assert_same_function, masked_copy
from rnip_ext import BoundedBatchNorm2d, param_groups
from rnip_ext import models as M
from rnip_ext.pruning import apply, plan, prune
from rnip_ext.pruning.plan import module_slices

OPTIMIZERS = {
    "sgd_nesterov": lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True),
    "adam_amsgrad": lambda groups: torch.optim.Adam(groups, amsgrad=True),
    "adamw": lambda groups: torch.optim.AdamW(groups),
}


def _batch(n=8):
    return torch.randn(n, 3, 16, 16), torch.randint(10, (n,))


def _trained(opt_name):
    """A vgg_small after three steps, so the optimiser has state; with a MultiStepLR."""
    model = M.vgg_small(widths=(8, 12, 16)).train()
    with torch.no_grad():
        for i in (1, 4, 8):
            model.features[i].weight.normal_()
    opt = OPTIMIZERS[opt_name](param_groups(model, lr=0.01, weight_decay=1e-3))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for _ in range(3):
        x, y = _batch()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    opt.zero_grad()
    return model, opt, sched


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _sliced(t, out_idx, in_idx):
    if out_idx is not None:
        t = t[out_idx]
    if in_idx is not None and t.dim() > 1:
        t = t[:, in_idx]
    return t


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_step_with_carried_state_equals_the_masked_original(opt_name):
    model, opt, sched = _trained(opt_name)
    p = plan(model, 0.4, min_channels=2, example_inputs=torch.randn(1, 3, 16, 16))
    masked = masked_copy(model, p.keep)
    ref_opt = OPTIMIZERS[opt_name](param_groups(masked, lr=0.01, weight_decay=1e-3))
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    hyper_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    n_state = len(opt.state)

    pruned = apply(model, p, optimizer=opt)

    # The optimiser now serves the pruned model: same groups, same hyper-parameters, same scheduler.
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == hyper_before
    assert {id(q) for g in opt.param_groups for q in g["params"]} == {id(q) for q in pruned.parameters()}
    assert len(opt.state) == n_state
    for q, state in opt.state.items():
        for key, value in state.items():
            if key == "step":
                continue
            assert value.shape == q.shape, key  # removed channels' state is gone, not zeroed
    assert sched.optimizer is opt and sched.last_epoch == 3

    x, y = _batch()
    _step(pruned, opt, x, y)
    _step(masked, ref_opt, x, y)

    slices = module_slices(p.groups, p.group_keep)
    pruned_modules, masked_modules = dict(pruned.named_modules()), dict(masked.named_modules())
    masked_state = dict(ref_opt.state)
    compared = 0
    for name, m in masked_modules.items():
        out_idx, in_idx = slices.get(name, [None, None])
        for attr, ref in m.named_parameters(recurse=False):
            got = getattr(pruned_modules[name], attr)
            expected = _sliced(ref.detach(), out_idx, in_idx)
            torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
            for key, value in opt.state[got].items():
                ref_value = masked_state[ref][key]
                if key != "step":
                    ref_value = _sliced(ref_value, out_idx, in_idx)
                torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
                compared += 1
    assert compared >= 7
    pruned.eval(), masked.eval()
    assert_same_function(pruned, masked, torch.randn(4, 3, 16, 16))
    # The scheduler goes on from where it was: the second milestone (4) divides the lr again.
    lrs = [g["lr"] for g in opt.param_groups]
    sched.step()
    assert sched.last_epoch == 4
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.1 for lr in lrs])


def test_prune_takes_the_optimizer_too_and_grads_are_sliced():
    model, opt, _ = _trained("sgd_nesterov")
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    x0 = torch.randn(1, 3, 16, 16)
    p = plan(model, 0.4, example_inputs=x0)
    pruned = prune(model, 0.4, example_inputs=x0, optimizer=opt)
    keep = p.group_keep["features.4"]
    torch.testing.assert_close(pruned.features[4].weight.grad, model.features[4].weight.grad[keep])
    torch.testing.assert_close(pruned.features[3].weight.grad,
                               model.features[3].weight.grad[keep][:, p.group_keep["features.1"]])
    torch.testing.assert_close(pruned.classifier.weight.grad, model.classifier.weight.grad[:, p.group_keep["features.8"]])
    assert pruned.classifier.bias.grad is not model.classifier.bias.grad  # shared-nothing copy
    torch.testing.assert_close(pruned.classifier.bias.grad, model.classifier.bias.grad)
    assert opt.param_groups[0]["params"][0] is pruned.features[1].weight


def _snapshot(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [list(g["params"]) for g in opt.param_groups],
            {id(q): dict(s) for q, s in opt.state.items()})


def _unchanged(model, opt, snap):
    state, params, opt_state = snap
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [list(g["params"]) for g in opt.param_groups] == params
    assert {id(q): dict(s) for q, s in opt.state.items()} == opt_state


def test_optimizer_for_another_model_is_refused_and_nothing_changes():
    model, opt, _ = _trained("sgd_nesterov")
    other, other_opt, _ = _trained("adam_amsgrad")
    p = plan(model, 0.4, example_inputs=torch.randn(1, 3, 16, 16))
    snap = _snapshot(model, other_opt)
    with pytest.raises(ValueError, match="built for another model"):
        apply(model, p, optimizer=other_opt)
    _unchanged(model, other_opt, snap)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        apply(model, p, optimizer=[model.features[0].weight])


def test_unknown_state_is_refused_naming_the_key_and_nothing_changes():
    model = M.vgg_small(widths=(8, 12, 16))
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)  # state 'sum', shaped like the parameter
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    p = plan(model, 0.4, example_inputs=torch.randn(1, 3, 16, 16))
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match="has state 'sum'"):
        apply(model, p, optimizer=opt)
    _unchanged(model, opt, snap)


def test_a_bias_created_by_folding_joins_its_weights_group():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1, bias=False), BoundedBatchNorm2d(6, bias=True), nn.ReLU(),
        nn.Conv2d(6, 4, 1, bias=False), BoundedBatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.0)  # removed channels output relu(beta) > 0: folded into conv 3
    opt = torch.optim.SGD(param_groups(model, lr=0.1), momentum=0.9)
    pruned = apply(model, plan(model, 0.5, example_inputs=torch.randn(1, 3, 4, 4)), optimizer=opt)
    assert pruned[3].bias is not None and model[3].bias is None
    group = next(g for g in opt.param_groups if any(q is pruned[3].weight for q in g["params"]))
    assert any(q is pruned[3].bias for q in group["params"])
    x = torch.randn(4, 3, 4, 4)
    F.cross_entropy(pruned(x), torch.randint(2, (4,))).backward()
    opt.step()  # the new bias trains with its layer
    assert opt.state[pruned[3].bias]["momentum_buffer"].shape == pruned[3].bias.shape == (pruned[3].out_channels,)
