"""RecedingRegularizer.focus: the penalty restricted to chosen channels (budget-aware training)."""

import io
import os

import pytest
import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d, RecedingRegularizer
from rnip_ext import functional as RF
from rnip_ext._backend import triton_available
from rnip_ext.pruning import apply, plan
from regularizer_helpers import assert_fused_step_matches_eager


def net(dtype=torch.float64, backend=None) -> nn.Module:
    kw = {} if backend is None else {"backend": backend}
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), BoundedBatchNorm2d(6, **kw), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), BoundedBatchNorm2d(5, **kw), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    ).to(dtype)
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.weight.copy_(torch.randn(m.num_features, dtype=dtype))
    return model


def reference(model, masks, strength, shift, normalize, weights):
    """float64 formula: strength * sum_l k_l sum_{c selected} term_c."""
    total = torch.zeros((), dtype=torch.float64)
    for (name, m), k in zip(((n, m) for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d)), weights):
        w = m.weight.double()
        term = (RF.relative_receding_penalty_per_channel(w, shift) if normalize == "layer"
                else RF.receding_penalty_per_channel(w, shift))
        if name in masks:
            total = total + k * (term * masks[name].double()).sum()
    return strength * total


@pytest.mark.parametrize("normalize", ["layer", None])
@pytest.mark.parametrize("cost", ["channels", "flops"])
def test_focused_value_and_gradient_match_the_masked_formula(normalize, cost):
    model = net()
    x0 = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    reg = RecedingRegularizer(model, 0.3, 1.0, normalize=normalize, cost=cost, example_inputs=x0, fused=False)
    masks = {"1": torch.rand(6) < 0.5, "4": torch.tensor([True, False, True, False, False])}
    masks["1"][0] = True
    assert reg.focus(masks) is reg and set(reg.focused) == {"1", "4"}
    value = reg()
    ref = reference(model, masks, 0.3, 1.0, normalize, reg.weights)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-14)
    got = torch.autograd.grad(value, [model[1].weight, model[4].weight])
    want = torch.autograd.grad(reference(model, masks, 0.3, 1.0, normalize, reg.weights),
                               [model[1].weight, model[4].weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    if normalize is None:  # no coupling between channels: unselected ones get exactly nothing
        assert (got[1][~masks["4"]] == 0).all()
    # A layer left out of the dict gets no penalty at all.
    reg.focus({"4": masks["4"]})
    assert reg().item() == pytest.approx(float(reference(model, {"4": masks["4"]}, 0.3, 1.0, normalize, reg.weights)))
    reg.focus(None)
    assert reg.focused is None
    torch.testing.assert_close(reg(), reference(model, {"1": torch.ones(6, dtype=torch.bool),
                                                      "4": torch.ones(5, dtype=torch.bool)},
                                                0.3, 1.0, normalize, reg.weights))


def test_focus_survives_rebinding_layers_of_the_same_names_and_widths_only():
    torch.manual_seed(0)
    model = net(torch.float32)
    x0 = torch.randn(1, 3, 6, 6)
    reg = RecedingRegularizer(model, 0.1, 1.0)
    p = plan(model, 0.3, example_inputs=x0)
    pruned = apply(model, p)
    widths = {n: m.num_features for n, m in pruned.named_modules() if isinstance(m, BoundedBatchNorm2d)}
    masks = {n: torch.arange(w) % 2 == 0 for n, w in widths.items()}
    reg.focus({"4": torch.ones(5, dtype=torch.bool)})
    reg.rebind(pruned)  # "4" changed width: the stale focus is dropped
    assert reg.focused is None or widths["4"] == 5
    reg.focus(masks)
    reg.rebind(pruned)  # same names and widths (what fit does after a callback pruned)
    assert {n: m.tolist() for n, m in reg.focused.items()} == {n: m.tolist() for n, m in masks.items()}
    torch.testing.assert_close(reg(), reference(pruned, masks, 0.1, 1.0, "layer", reg.weights).float())


@pytest.mark.parametrize("masks, error, match", [
    ({"9": torch.ones(3, dtype=torch.bool)}, ValueError, "'9' is not a regularised layer"),
    ({"1": torch.ones(5, dtype=torch.bool)}, ValueError, "1-D bool tensor of 6 entries"),
    ({"1": torch.ones(6)}, ValueError, "1-D bool tensor of 6 entries"),
    ({"1": torch.ones(2, 3, dtype=torch.bool)}, ValueError, "1-D bool tensor of 6 entries"),
    ([True] * 6, TypeError, "dict"),
])
def test_bad_focus_is_refused_and_changes_nothing(masks, error, match):
    model = net()
    reg = RecedingRegularizer(model, 0.1, 1.0)
    good = {"1": torch.arange(6) < 2}
    reg.focus(good)
    before = reg().item()
    with pytest.raises(error, match=match):
        reg.focus(masks)
    assert reg().item() == before and reg.focused["1"].tolist() == good["1"].tolist()


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    model = net()
    reg = RecedingRegularizer(model, 0.25, 1.0)
    reg.focus({"4": torch.tensor([False, True, True, False, True])})
    buffer = io.BytesIO()
    torch.save({"regularizer": reg.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["regularizer"]
    other = RecedingRegularizer(model, 1e-3, 1.0)
    other.load_state_dict(state)
    assert other.strength == 0.25 and other.focused["4"].tolist() == [False, True, True, False, True]
    assert "1" not in other.focused
    torch.testing.assert_close(other(), reg())
    other.load_state_dict(RecedingRegularizer(model, 0.5, 1.0).state_dict())
    assert other.focused is None and other.strength == 0.5


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_focused_fused_record_matches_the_eager_penalty():
    device = torch.device(os.environ.get("RNIP_TEST_DEVICE", "cpu"))
    torch.manual_seed(7)
    fused_net = net(torch.float32, backend="triton").to(device)
    eager_net = net(torch.float32).to(device)
    eager_net.load_state_dict(fused_net.state_dict())
    fused = RecedingRegularizer(fused_net, 0.05, 1.0, normalize=None)
    eager = RecedingRegularizer(eager_net, 0.05, 1.0, normalize=None, fused=False)
    assert fused.uses_fused_record
    masks = {"1": torch.arange(6) % 3 == 0, "4": torch.arange(5) > 2}
    fused.focus(masks)
    eager.focus(masks)
    x, y = torch.randn(4, 3, 5, 5, device=device), torch.randint(2, (4,), device=device)
    assert_fused_step_matches_eager(fused_net, fused, eager_net, eager, x, y)
