"""Regularisers and the paper's optimiser parameter groups."""

import pytest
import torch
from torch import nn

from rnip_ext import (
    BoundedBatchNorm2d,
    L1Regularizer,
    PolarizationRegularizer,
    RecedingRegularizer,
    param_groups,
)


def bounded_model(dtype=torch.float64) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        BoundedBatchNorm2d(6, bias=True),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False),
        BoundedBatchNorm2d(5),
        BoundedBatchNorm2d(5, affine=False),  # no logit: ignored by the regulariser
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    ).to(dtype)


def plain_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3))


@pytest.mark.parametrize("strength,shift", [(1e-3, 3.0), (1e-4, 0.0), (0.5, -1.0)])
def test_receding_value_and_gradient_match_the_formula(strength, shift):
    model = bounded_model()
    reg = RecedingRegularizer(model, strength=strength, shift=shift)
    assert len(reg.layers) == 2
    value = reg()
    logits = [model[1].weight, model[4].weight]
    expected = 0.0
    for w in logits:
        s = torch.sigmoid(w.detach() + shift)
        expected = expected + (s * (1 - torch.log(s))).sum()
    torch.testing.assert_close(value, strength * expected)
    torch.testing.assert_close(reg.penalty(), expected)
    value.backward()
    for w in logits:
        s = torch.sigmoid(w.detach() + shift)
        torch.testing.assert_close(w.grad, -strength * torch.log(s) * s * (1 - s))
    assert model[0].weight.grad is None  # only the logits are regularised


def test_receding_pushes_low_importance_channels_down_more():
    layer = BoundedBatchNorm2d(2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-4.0, 2.0]))
    reg = RecedingRegularizer(nn.Sequential(layer), strength=1.0, shift=3.0)
    reg().backward()
    # With shift 3 a channel at logit -4 (s = sigmoid(-1)) is pushed far harder than one at +2.
    assert layer.weight.grad[0] > 50 * layer.weight.grad[1] > 0


def test_receding_combines_with_a_loss_through_autograd():
    model = bounded_model()
    reg = RecedingRegularizer(model, strength=1e-2, shift=0.0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    loss = model(x).square().mean() + reg()
    loss.backward()
    assert model[4].weight.grad is not None and torch.isfinite(model[4].weight.grad).all()


def test_receding_bad_arguments():
    with pytest.raises(ValueError, match="no BoundedBatchNorm2d"):
        RecedingRegularizer(plain_model())
    with pytest.raises(ValueError, match="strength"):
        RecedingRegularizer(bounded_model(), strength=-1.0)
    with pytest.raises(ValueError, match="strength"):
        RecedingRegularizer(bounded_model(), strength=float("inf"))
    with pytest.raises(ValueError, match="shift"):
        RecedingRegularizer(bounded_model(), shift=float("nan"))
    with pytest.raises(TypeError, match="nn.Module"):
        RecedingRegularizer([1, 2])
    assert "layers=2" in repr(RecedingRegularizer(bounded_model()))


def test_l1_value_and_gradient():
    model = plain_model()
    with torch.no_grad():
        model[1].weight.normal_()
        model[3].weight.normal_()
    reg = L1Regularizer(model, strength=0.1)
    value = reg()
    expected = 0.1 * (model[1].weight.detach().abs().sum() + model[3].weight.detach().abs().sum())
    torch.testing.assert_close(value, expected)
    value.backward()
    torch.testing.assert_close(model[1].weight.grad, 0.1 * torch.sign(model[1].weight.detach()))
    with pytest.raises(ValueError, match="no affine nn.BatchNorm"):
        L1Regularizer(bounded_model())


def test_polarization_value_gradient_and_clamp():
    model = plain_model()
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 1.5)
        model[3].weight.uniform_(-0.5, 1.5)
    reg = PolarizationRegularizer(model, strength=0.01, t=1.2)
    gammas = torch.cat([model[1].weight.detach(), model[3].weight.detach()])
    mean = gammas.mean()
    expected = 0.01 * (1.2 * gammas.abs() - (gammas - mean).abs()).sum()
    value = reg()
    torch.testing.assert_close(value, expected)
    value.backward()
    g1 = model[1].weight.detach()
    torch.testing.assert_close(
        model[1].weight.grad, 0.01 * (1.2 * torch.sign(g1) - torch.sign(g1 - mean))
    )
    reg.clamp_()
    for bn in (model[1], model[3]):
        assert bn.weight.min() >= 0 and bn.weight.max() <= 1
    with pytest.raises(ValueError, match="t must be"):
        PolarizationRegularizer(model, t=float("nan"))
    with pytest.raises(ValueError, match="no affine nn.BatchNorm"):
        PolarizationRegularizer(bounded_model())


def test_param_groups_follow_the_paper_recipe():
    model = bounded_model(torch.float32)
    model[0].bias.requires_grad_(False)
    groups = param_groups(model, lr=0.1, weight_decay=1e-4)
    assert len(groups) == 2
    bn_ids = {id(p) for p in groups[0]["params"]}
    assert bn_ids == {id(model[1].weight), id(model[1].bias), id(model[4].weight)}
    assert groups[0]["lr"] == pytest.approx(1.0) and groups[0]["weight_decay"] == 0.0
    other_ids = {id(p) for p in groups[1]["params"]}
    assert other_ids == {id(model[0].weight), id(model[3].weight), id(model[8].weight), id(model[8].bias)}
    assert groups[1]["lr"] == 0.1 and groups[1]["weight_decay"] == 1e-4
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    # Every trainable parameter exactly once.
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(
        1 for p in model.parameters() if p.requires_grad
    )


def test_param_groups_shared_parameters_once_and_custom_types():
    conv = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(2), conv)
    groups = param_groups(model, lr=0.05, bn_lr_scale=2.0, bn_types=(nn.BatchNorm2d,))
    assert groups[0]["lr"] == pytest.approx(0.1) and len(groups[0]["params"]) == 2
    assert len(groups[1]["params"]) == 2
    only_plain = param_groups(nn.Sequential(nn.Linear(2, 2)), lr=0.1)
    assert len(only_plain) == 1 and only_plain[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="lr"):
        param_groups(model, lr=-0.1)
    with pytest.raises(ValueError, match="bn_lr_scale"):
        param_groups(model, lr=0.1, bn_lr_scale=float("nan"))
