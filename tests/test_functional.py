"""The eager reference functions: bounded batch norm and the receding penalty."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rnip_ext import functional as RF


def penalty_float64_by_definition(w: torch.Tensor, shift: float) -> torch.Tensor:
    """``s * (1 - log s)`` straight from the definition, in float64 (valid for moderate |w|)."""
    s = 1.0 / (1.0 + torch.exp(-(w.double() + shift)))
    return s * (1.0 - torch.log(s))


@pytest.mark.parametrize("shift", [0.0, 3.0, -2.5])
def test_penalty_matches_definition_and_gradient_formula(shift):
    w = torch.randn(50, dtype=torch.float64) * 4
    w.requires_grad_()
    per_channel = RF.receding_penalty_per_channel(w, shift)
    torch.testing.assert_close(per_channel, penalty_float64_by_definition(w.detach(), shift))
    total = RF.receding_penalty(w, shift)
    torch.testing.assert_close(total, per_channel.sum())
    total.backward()
    s = torch.sigmoid(w.detach() + shift)
    torch.testing.assert_close(w.grad, -torch.log(s) * s * (1 - s))
    torch.testing.assert_close(RF.receding_penalty_grad(w.detach(), shift), w.grad)
    assert (w.grad >= 0).all()


def test_gradcheck_float64():
    w = (torch.randn(7, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: RF.receding_penalty(w, 1.5), (w,))
    assert torch.autograd.gradcheck(lambda w: RF.receding_penalty_per_channel(w, -0.5), (w,))


def test_known_values_from_the_paper():
    # Per channel R runs from 0 to 1; dR/dw peaks near w + b = -1.18 at about 0.26,
    # is 0.173 at 0 and 0.0022 at +3 (PAPER.md).
    z = torch.tensor([0.0, 3.0, -1.18], dtype=torch.float64)
    g = RF.receding_penalty_grad(z)
    assert g[0].item() == pytest.approx(math.log(2) / 4, rel=1e-12)
    assert g[0].item() == pytest.approx(0.173, abs=1e-3)
    assert g[1].item() == pytest.approx(0.0022, abs=1e-4)
    assert g[2].item() == pytest.approx(0.26, abs=5e-3)
    grid = torch.linspace(-6, 6, 12001, dtype=torch.float64)
    assert grid[RF.receding_penalty_grad(grid).argmax()].item() == pytest.approx(-1.18, abs=0.02)
    assert RF.receding_penalty(torch.tensor([40.0])).item() == pytest.approx(1.0)
    assert RF.receding_penalty(torch.tensor([-40.0])).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_stable_for_extreme_weights(dtype):
    w = torch.tensor([-1e4, -1e3, -90.0, -30.0, 0.0, 30.0, 90.0, 1e3, 1e4], dtype=dtype)
    w.requires_grad_()
    p = RF.receding_penalty_per_channel(w, shift=3.0)
    p.sum().backward()
    assert torch.isfinite(p).all() and torch.isfinite(w.grad).all()
    assert (p >= 0).all() and (p <= 1 + 1e-3).all()
    assert (w.grad >= 0).all()
    assert p[0].item() == 0.0 and w.grad[0].item() == 0.0
    assert p[-1].item() == pytest.approx(1.0, abs=1e-3)


def test_gradient_keeps_relative_precision_for_large_weights():
    # Where s rounds to 1, the gradient ~ exp(-2z) must not collapse to 0 through cancellation.
    w = torch.tensor([10.0, 15.0], requires_grad=True)
    RF.receding_penalty(w).backward()
    expected = torch.exp(-2 * w.detach().double())  # -log s * (1-s) * s ~ e^-z * e^-z
    torch.testing.assert_close(w.grad.double(), expected, rtol=1e-3, atol=0)


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-60, 60, allow_nan=False), min_size=1, max_size=20),
    shift=st.floats(-5, 5, allow_nan=False),
)
def test_property_penalty_between_zero_and_count(values, shift):
    w = torch.tensor(values, dtype=torch.float64)
    p = RF.receding_penalty_per_channel(w, shift)
    assert ((p >= 0) & (p <= 1)).all()
    torch.testing.assert_close(p, penalty_float64_by_definition(w, shift), rtol=1e-9, atol=1e-12)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        RF.receding_penalty([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        RF.receding_penalty(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shift must be finite"):
        RF.receding_penalty(torch.zeros(3), float("nan"))
    with pytest.raises(TypeError, match="shift must be a Python number"):
        RF.receding_penalty(torch.zeros(3), torch.tensor(1.0))


@pytest.mark.parametrize("training", [True, False])
def test_bounded_batch_norm_is_batch_norm_with_sigmoid_scale(training):
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    ours = RF.bounded_batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4)
    ref = F.batch_norm(x, rm2, rv2, torch.sigmoid(w), b, training, 0.3, 1e-4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(rm, rm2, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv2, rtol=0, atol=0)
    assert RF.bounded_scale(None) is None


# --- the layer-normalised receding penalty -------------------------------------------------


def relative_penalty_float64_by_definition(w: torch.Tensor, shift: float) -> torch.Tensor:
    """``t (1 - log t)``, ``t = u e^b / (1 - u + u e^b)``, ``u = s / max s``, straight from the definition."""
    s = 1.0 / (1.0 + torch.exp(-w.double()))
    u = s / s.max()
    t = u * math.exp(shift) / (1 - u + u * math.exp(shift))
    return t * (1.0 - torch.log(t))


def common_scale_direction(w: torch.Tensor) -> torch.Tensor:
    """``dw`` that multiplies every ``sigmoid(w_c)`` by the same factor: ``d log s_c = (1 - s_c) dw_c``."""
    return 1.0 / torch.sigmoid(-w.detach())


@pytest.mark.parametrize("shift", [0.0, 3.0, -2.5])
def test_relative_penalty_matches_definition(shift):
    w = torch.randn(40, dtype=torch.float64) * 3
    per_channel = RF.relative_receding_penalty_per_channel(w, shift)
    torch.testing.assert_close(per_channel, relative_penalty_float64_by_definition(w, shift), rtol=1e-9, atol=1e-12)
    assert per_channel[w.argmax()] == 1.0  # the strongest channel: u = 1, t = 1
    torch.testing.assert_close(RF.relative_receding_penalty(w, shift), per_channel.sum())


@pytest.mark.parametrize("shift", [0.0, 3.0, -2.5])
def test_relative_penalty_gradcheck_float64(shift):
    w = (torch.randn(9, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: RF.relative_receding_penalty_per_channel(v, shift), (w,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relative_penalty_stable_for_extreme_weights(dtype):
    w = torch.tensor([-1e4, -80.0, -1.0, 0.0, 30.0, 1e4], dtype=dtype, requires_grad=True)
    for shift in (0.0, 3.0, -20.0):
        value = RF.relative_receding_penalty(w, shift)
        (grad,) = torch.autograd.grad(value, w)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        assert (grad[:-1] >= 0).all()  # every channel but the top is pushed down (or left alone)


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_common_scale_direction_has_zero_gradient_only_when_normalised(shift):
    w = torch.randn(16, dtype=torch.float64)
    # Move every sigmoid(w) by exactly 1e-3 (the whole layer receded together).
    w = (math.log(1e-3) + F.logsigmoid(w) - torch.log1p(-1e-3 * torch.sigmoid(w))).requires_grad_()
    direction = common_scale_direction(w)
    (g_rel,) = torch.autograd.grad(RF.relative_receding_penalty(w, shift), w)
    (g_paper,) = torch.autograd.grad(RF.receding_penalty(w, shift), w)
    along_rel = (g_rel * direction).sum()
    assert along_rel.abs() <= 1e-12 * (g_rel.abs() * direction).sum()
    # The paper's penalty grows along the common scale: descent shrinks the whole layer.
    assert (g_paper * direction).sum() > 0.1 * (g_paper.abs() * direction).sum()
    assert g_rel[w.argmax()] <= 0  # the top channel is pulled up, never down


def _segments(sizes, scale=3.0):
    layer, _ = RF._segment_layout(sizes)
    return torch.randn(sum(sizes), dtype=torch.float64) * scale, layer


def _per_layer_reference(w, sizes, shift, costs=None):
    """``sum_l k_l * relative_receding_penalty(w_l)``, one layer at a time (plain autograd)."""
    costs = [1.0] * len(sizes) if costs is None else costs
    return sum(k * RF.relative_receding_penalty(part, shift) for k, part in zip(costs, w.split(list(sizes))))


@pytest.mark.parametrize("shift", [0.0, 3.0, -2.5])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "cost_weighted"])
def test_segmented_relative_penalty_gradcheck_float64(shift, weighted):
    sizes = (4, 1, 6, 3)
    w, layer = _segments(sizes)
    cost = None
    if weighted:
        _, cost = RF._segment_layout(sizes, dtype=torch.float64, costs=torch.rand(len(sizes)).tolist())
    w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: RF._segmented_relative_receding_penalty(v, layer, len(sizes), shift, cost), (w,)
    )


@pytest.mark.parametrize("shift", [0.0, 3.0, -20.0])
def test_segmented_relative_penalty_equals_the_per_layer_formula(shift):
    sizes = (5, 1, 7, 4, 3, 6)
    w, layer = _segments(sizes)
    with torch.no_grad():
        w[:5] = torch.tensor([30.0, -30.0, 29.0, -1.0, 30.0])  # extreme logits, a tie at the top
        w[6:13] = -760.0 + torch.randn(7, dtype=torch.float64)  # every sigmoid underflows to 0
        w[13:17] = torch.tensor([-30.0, -30.0, -30.0, -30.0])  # all tied
    assert (torch.sigmoid(w[6:13]) == 0).all()
    costs = (torch.rand(len(sizes), dtype=torch.float64) * 2).tolist()
    _, cost = RF._segment_layout(sizes, dtype=torch.float64, costs=costs)
    for k, kc in ((None, None), (costs, cost)):
        a = w.clone().requires_grad_()
        b = w.clone().requires_grad_()
        value = RF._segmented_relative_receding_penalty(a, layer, len(sizes), shift, kc)
        ref = _per_layer_reference(b, sizes, shift, k)
        value.backward()
        ref.backward()
        torch.testing.assert_close(value, ref, rtol=1e-13, atol=0.0)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-300)
        assert torch.isfinite(a.grad).all()


def test_segmented_relative_penalty_float32_matches_float64():
    sizes = (8, 3, 16)
    w, layer = _segments(sizes)
    a = w.float().requires_grad_()
    value = RF._segmented_relative_receding_penalty(a, layer, len(sizes), 3.0)
    value.backward()
    b = w.clone().requires_grad_()
    ref = _per_layer_reference(b, sizes, 3.0)
    ref.backward()
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


def test_segmented_relative_penalty_bad_arguments():
    w, layer = _segments((3, 2))
    with pytest.raises(TypeError, match="floating-point"):
        RF._segmented_relative_receding_penalty(layer, layer, 2)
    with pytest.raises(ValueError, match="1-D of one length"):
        RF._segmented_relative_receding_penalty(w[:4], layer, 2)
    with pytest.raises(ValueError, match="cost must have"):
        RF._segmented_relative_receding_penalty(w, layer, 2, 0.0, torch.ones(3, dtype=torch.float64))


def test_segmented_relative_penalty_refuses_double_backward():
    """Its backward is not differentiable: a second derivative raises rather than being wrong."""
    w, layer = _segments((3, 2))
    w.requires_grad_()
    (g,) = torch.autograd.grad(RF._segmented_relative_receding_penalty(w, layer, 2, 1.0), w, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|twice"):
        g.sum().backward()
