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
    reg = RecedingRegularizer(model, strength=strength, shift=shift, normalize=None)
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
    reg = RecedingRegularizer(nn.Sequential(layer), strength=1.0, shift=3.0, normalize=None)
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


# --- layer-normalised penalty, cost weights, rebinding -------------------------------------

import math  # noqa: E402
import os  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from rnip_ext import functional as RF  # noqa: E402
from rnip_ext import models as M  # noqa: E402
from rnip_ext._backend import triton_available  # noqa: E402
from rnip_ext.pruning import apply, plan  # noqa: E402
from rnip_ext.pruning.flops import channel_costs  # noqa: E402
from regularizer_helpers import assert_fused_step_matches_eager  # noqa: E402


def test_default_is_layer_normalised_and_matches_the_functional_formula():
    model = bounded_model()
    reg = RecedingRegularizer(model, strength=0.3, shift=2.0)
    assert reg.normalize == "layer" and reg.cost == "channels" and not reg.uses_fused_record
    assert all(m._receding_shift is None for m in reg.layers)  # nothing recorded on the fused path
    value = reg()
    logits = [model[1].weight, model[4].weight]
    expected = sum(RF.relative_receding_penalty(w.detach(), 2.0) for w in logits)
    torch.testing.assert_close(value, 0.3 * expected)
    value.backward()
    for w in logits:
        ref = w.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(0.3 * RF.relative_receding_penalty(ref, 2.0), ref)
        torch.testing.assert_close(w.grad, g)


def _moved_first_layer(model, a=1e-3):
    with torch.no_grad():
        w = model.features[1].weight
        w.copy_(math.log(a) + F.logsigmoid(w) - torch.log1p(-a * torch.sigmoid(w)))
    return model


@pytest.mark.parametrize("cost", ["channels", "flops"])
def test_penalty_does_not_push_a_renormalised_layers_common_scale_down(cost):
    model = _moved_first_layer(M.vgg_small(widths=(8, 12, 16)).double())
    w = model.features[1].weight
    direction = 1.0 / torch.sigmoid(-w.detach())  # multiplies every sigmoid(w_c) by one factor
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    along = {}
    for normalize in ("layer", None):
        reg = RecedingRegularizer(model, 1e-2, 1.0, normalize=normalize, cost=cost, example_inputs=x)
        (g,) = torch.autograd.grad(reg(), w)
        along[normalize] = ((g * direction).sum(), (g.abs() * direction).sum())
    assert along["layer"][0].abs() <= 1e-12 * along["layer"][1]
    assert along[None][0] > 0.1 * along[None][1]  # the paper's penalty shrinks the whole layer


def test_flops_weights_have_mean_one_and_follow_channel_costs():
    model = M.vgg_small(widths=(8, 12, 16))
    x = torch.randn(2, 3, 16, 16)
    for cost, kind in (("flops", "flops"), ("params", "params")):
        reg = RecedingRegularizer(model, 1e-2, 1.0, cost=cost, example_inputs=x)
        costs = channel_costs(model, x, kind)
        n = [m.num_features for m in reg.layers]
        assert sum(k * c for k, c in zip(reg.weights, n)) == pytest.approx(sum(n))
        ratios = [k / costs[name] for k, name in zip(reg.weights, ["features.1", "features.4", "features.8"])]
        assert max(ratios) == pytest.approx(min(ratios))
        per_layer = [reg.per_channel(m).sum() for m in reg.layers]
        torch.testing.assert_close(reg(), 1e-2 * sum(k * p for k, p in zip(reg.weights, per_layer)))
    # Batch size does not change the weights (they are normalised).
    a = RecedingRegularizer(model, cost="flops", example_inputs=torch.randn(1, 3, 16, 16)).weights
    b = RecedingRegularizer(model, cost="flops", example_inputs=torch.randn(4, 3, 16, 16)).weights
    assert a == pytest.approx(b)


def test_channels_outside_any_prunable_group_get_zero_cost_weight():
    model = M.resnet56_cifar()
    reg = RecedingRegularizer(model, cost="flops", example_inputs=torch.randn(1, 3, 32, 32))
    names = {id(m): n for n, m in model.named_modules()}
    for m, k in zip(reg.layers, reg.weights):
        inner = names[id(m)].endswith(".bn1")  # only the inner BatchNorm of each block (not the stem)
        assert (k > 0) == inner, names[id(m)]


def test_rebind_after_pruning_binds_the_new_layers_and_recomputes_costs():
    model = M.vgg_small(widths=(8, 12, 16))
    x = torch.randn(1, 3, 16, 16)
    reg = RecedingRegularizer(model, 1e-2, 1.0, normalize=None, cost="flops", example_inputs=x)
    old_layers, old_weights = list(reg.layers), list(reg.weights)
    pruned = apply(model, plan(model, 0.5, example_inputs=x))
    assert reg.rebind(pruned) is reg
    new_bns = [pruned.features[1], pruned.features[4], pruned.features[8]]
    assert all(a is b for a, b in zip(reg.layers, new_bns))
    assert all(m._receding_shift == 1.0 for m in new_bns)
    assert all(m._receding_shift is None for m in old_layers)  # the old model is detached
    fresh = RecedingRegularizer(pruned, 1e-2, 1.0, normalize=None, cost="flops", example_inputs=x)
    assert reg.weights == pytest.approx(fresh.weights) and reg.weights != pytest.approx(old_weights)
    torch.testing.assert_close(reg(), fresh())
    with pytest.raises(ValueError, match="no BoundedBatchNorm2d"):
        reg.rebind(plain_model())
    assert all(a is b for a, b in zip(reg.layers, new_bns))  # a failed rebind changes nothing


def test_normalize_and_cost_bad_arguments():
    with pytest.raises(ValueError, match="normalize"):
        RecedingRegularizer(bounded_model(), normalize="global")
    with pytest.raises(ValueError, match="cost must be one of"):
        RecedingRegularizer(bounded_model(), cost="macs")
    with pytest.raises(ValueError, match="example_inputs"):
        RecedingRegularizer(bounded_model(), cost="flops")
    lone = nn.Sequential(nn.Conv2d(3, 4, 1), BoundedBatchNorm2d(4))  # nothing reads the channels
    with pytest.raises(ValueError, match="no regularised channel can be removed"):
        RecedingRegularizer(lone, cost="flops", example_inputs=torch.randn(1, 3, 4, 4))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("cost", ["flops", "params"])
def test_cost_weighted_fused_record_matches_the_eager_penalty(cost):
    device = torch.device(os.environ.get("RNIP_TEST_DEVICE", "cpu"))

    def make():
        torch.manual_seed(4321)
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False), BoundedBatchNorm2d(6, backend="triton"), nn.ReLU(),
            nn.Conv2d(6, 4, 1, bias=False), BoundedBatchNorm2d(4, backend="triton"),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
        ).to(device)
        with torch.no_grad():
            net[1].weight.sub_(2.0)
        return net

    x0 = torch.randn(1, 3, 5, 5, device=device)
    fused_net, eager_net = make(), make()
    fused = RecedingRegularizer(fused_net, 0.05, 1.0, normalize=None, cost=cost, example_inputs=x0)
    eager = RecedingRegularizer(eager_net, 0.05, 1.0, normalize=None, cost=cost, example_inputs=x0, fused=False)
    assert fused.uses_fused_record and fused.weights == eager.weights and fused.weights[0] != 1.0
    x, y = torch.randn(4, 3, 5, 5, device=device), torch.randint(3, (4,), device=device)
    assert_fused_step_matches_eager(fused_net, fused, eager_net, eager, x, y)


def _thirteen_layer_net(widths):
    layers = []
    c_in = 3
    for c in widths:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), BoundedBatchNorm2d(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 2)).double()


@pytest.mark.parametrize("normalize", ["layer", None])
@pytest.mark.parametrize("cost", ["channels", "flops"])
def test_thirteen_layers_match_the_per_layer_formula(normalize, cost):
    widths = torch.randint(1, 12, (13,)).tolist()
    model = _thirteen_layer_net(widths)
    bns = [m for m in model if isinstance(m, BoundedBatchNorm2d)]
    with torch.no_grad():
        bns[0].weight[:2] = torch.tensor([30.0, -30.0])[: widths[0]]
        bns[1].weight.fill_(-760.0)  # sigmoid underflows: u = 1 for all (tied at the top)
        bns[2].weight[0] = 30.0
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    reg = RecedingRegularizer(model, 0.3, 2.0, normalize=normalize, cost=cost, example_inputs=x)
    assert len(reg.layers) == 13
    fn = RF.relative_receding_penalty if normalize == "layer" else RF.receding_penalty
    refs = [m.weight.detach().clone().requires_grad_() for m in bns]
    expected = 0.3 * sum(k * fn(w, 2.0) for k, w in zip(reg.weights, refs))
    expected.backward()
    for _ in range(2):  # the second call reuses the cached layout
        for m in bns:
            m.weight.grad = None
        value = reg()
        value.backward()
        torch.testing.assert_close(value, expected, rtol=1e-13, atol=0.0)
        for m, w in zip(bns, refs):
            torch.testing.assert_close(m.weight.grad, w.grad, rtol=1e-12, atol=1e-300)


def test_layout_follows_weights_dtype_and_size_changes():
    model = _thirteen_layer_net([3, 4])
    reg = RecedingRegularizer(model, 1.0, 1.0)
    bns = reg.layers
    ref = sum(RF.relative_receding_penalty(m.weight.detach(), 1.0) for m in bns)
    torch.testing.assert_close(reg(), ref)
    reg.weights = [2.0, 0.5]  # edited in place: the per-channel weights follow
    torch.testing.assert_close(reg(), sum(k * RF.relative_receding_penalty(m.weight.detach(), 1.0)
                                          for k, m in zip(reg.weights, bns)))
    model.float()
    assert reg().dtype == torch.float32
    single = RecedingRegularizer(nn.Sequential(BoundedBatchNorm2d(5, dtype=torch.float64)), 1.0, 1.0, normalize=None)
    torch.testing.assert_close(single(), RF.receding_penalty(single.layers[0].weight.detach(), 1.0))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_fused_records_mixed_with_stale_ones_match_the_eager_penalty():
    """Layers with a record use it; a layer without one (here: in eval mode, so its forward
    records nothing) is computed eagerly; together they equal the eager penalty, value and gradient."""
    device = torch.device(os.environ.get("RNIP_TEST_DEVICE", "cpu"))

    def make():
        torch.manual_seed(99)
        net = nn.Sequential(
            nn.Conv2d(3, 5, 1, bias=False), BoundedBatchNorm2d(5, backend="triton"),
            nn.Conv2d(5, 4, 1, bias=False), BoundedBatchNorm2d(4, backend="triton"),
            nn.Conv2d(4, 6, 1, bias=False), BoundedBatchNorm2d(6, backend="triton"),
        ).to(device)
        net[3].eval()
        return net

    fused_net, eager_net = make(), make()
    fused = RecedingRegularizer(fused_net, 0.1, 2.0, normalize=None)
    eager = RecedingRegularizer(eager_net, 0.1, 2.0, normalize=None, fused=False)
    x = torch.randn(2, 3, 4, 4, device=device)
    dy = torch.randn(2, 6, 4, 4, device=device)
    out = fused_net(x)
    assert fused_net[3]._recorded_penalty is None
    assert all(fused_net[i]._recorded_penalty is not None for i in (1, 5))
    value = fused()
    assert all(fused_net[i]._recorded_penalty is None for i in (1, 3, 5))
    torch.autograd.backward([out, value], [dy, torch.ones((), device=device)])
    ref = eager()
    torch.autograd.backward([eager_net(x), ref], [dy, torch.ones((), device=device)])
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(fused_net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
