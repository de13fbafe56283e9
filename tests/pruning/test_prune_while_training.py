"""The pieces together: train, remove receded channels between epochs, keep training with the
same optimiser (state carried), scheduler, regulariser and budget controller."""

import math

import pytest
import torch
import torch.nn.functional as F

from rnip_ext import RecedingRegularizer, param_groups
from rnip_ext import models as M
from rnip_ext.pruning import BudgetController, RecedingSchedule, active_flops, count_flops


def test_three_epochs_with_removal_between_them():
    torch.manual_seed(0)
    model = M.vgg_small(widths=(8, 12, 16)).train()
    with torch.no_grad():  # a few channels already receded relative to their layer
        model.features[1].weight[:3] = math.log(1e-4)
        model.features[4].weight[5:9] = math.log(1e-4)
    x0 = torch.randn(1, 3, 16, 16)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(10, (8,))) for _ in range(4)]
    opt = torch.optim.SGD(param_groups(model, lr=0.02), momentum=0.9, nesterov=True)
    lr_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    reg = RecedingRegularizer(model, 1e-2, 1.0, cost="flops", example_inputs=x0)
    schedule = RecedingSchedule(x0)
    ctrl = BudgetController(0.5, by_epoch=3)
    full = count_flops(model, x0)
    widths = []
    for epoch in range(3):
        for x, y in data:
            loss = F.cross_entropy(model(x), y) + reg()
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
        lr_sched.step()
        reg.strength = ctrl.update(epoch, active_flops(model, x0) / full, reg.strength)
        step = schedule.step(epoch, model, opt, reg)
        model = step.model
        widths.append([model.features[i].num_features for i in (1, 4, 8)])
        # Everything refers to the current model.
        params = {id(p) for p in model.parameters()}
        assert {id(p) for g in opt.param_groups for p in g["params"]} == params
        assert {id(m) for m in reg.layers} == {id(model.features[i]) for i in (1, 4, 8)}
        for p, state in opt.state.items():
            assert id(p) in params and state["momentum_buffer"].shape == p.shape
    assert widths[0][:2] == [5, 8]  # the receded channels left after the first epoch
    assert all(a >= b for w0, w1 in zip(widths, widths[1:]) for a, b in zip(w0, w1))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.1)  # the scheduler went on (bounded BN group: 10x lr)
    assert len(ctrl.history) == 3 and reg.weights != [1.0, 1.0, 1.0]
