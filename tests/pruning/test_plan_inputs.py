"""plan() edge cases: example inputs that do not fit the model, min_channels wider than layers."""

import warnings

import pytest
import torch
from torch import nn

from rnip_ext import models as M
from rnip_ext.pruning import plan


@pytest.mark.parametrize("inputs, match", [
    (lambda: torch.randn(1, 1, 16, 16), r"do not fit VGG, or its forward fails on them: got torch.float32 \(1, 1, 16, 16\).*3 channels"),
    (lambda: torch.randn(3, 16, 16), r"do not fit VGG, or its forward fails on them: got torch.float32 \(3, 16, 16\).*4D"),
    (lambda: torch.randint(0, 255, (1, 3, 16, 16)), r"floating-point tensors, got torch.int64"),
    (lambda: (torch.randn(1, 3, 16, 16), torch.randn(2)), r"forward takes 1 input\(s\), got 2"),
    (lambda: "image.png", "must be a tensor or a tuple of tensors, got str"),
    (lambda: (), "got nothing"),
])
def test_example_inputs_that_do_not_fit_give_one_clear_value_error(inputs, match, capfd):
    model = M.vgg_small(10)
    with pytest.raises(ValueError, match=match) as info:
        plan(model, 0.5, example_inputs=inputs())
    message = str(info.value)
    assert "\n" not in message and len(message) < 400  # not the torch.fx graph dump
    assert "Traceback" not in capfd.readouterr().err  # nor fx's own printed traceback
    # The model is left as it was.
    assert model.training and plan(model, 0.5, example_inputs=torch.randn(1, 3, 16, 16)).achieved_ratio > 0


def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)).eval()


def test_min_channels_wider_than_a_layer_warns_and_keeps_it_whole():
    x = torch.randn(1, 3, 12, 12)
    with pytest.warns(UserWarning, match=r"min_channels=6 exceeds the width of 1 \(4\)"):
        p = plan(small_net(), 0.5, "local", 6, example_inputs=x)
    assert len(p.group_keep["1"]) == 4 and len(p.group_keep["4"]) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every layer can lose channels
        plan(small_net(), 0.5, "local", 3, example_inputs=x)


def test_min_channels_at_least_every_layer_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match=r"min_channels=16 is at least the width of every prunable layer .*16"):
        plan(small_net(), 0.5, min_channels=16, example_inputs=torch.randn(1, 3, 12, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert plan(small_net(), 0.0, min_channels=16, example_inputs=torch.randn(1, 3, 12, 12)).achieved_ratio == 0
