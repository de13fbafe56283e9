"""Shared helpers of the conversion tests: trained-looking BatchNorms and the before/after comparison."""

import copy

import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d

# Activation modules counted before and after a conversion (ReLU6 may become a Hardtanh).
ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid,
    nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Tanh,
)  # fmt: skip


def count_activations(model: nn.Module) -> int:
    return sum(isinstance(m, ACTIVATIONS) for m in model.modules())


def trained_looking(model: nn.Module, generator: torch.Generator, *, peak: float = 2.0, signed: bool = True,
                    tiny: float = 0.1) -> nn.Module:
    """Every BatchNorm gets ``|gamma| ~ U(0, peak)`` (random signs when ``signed``), a share ``tiny`` of
    channels scaled by 1e-6, channel 0 exactly 0, ``beta ~ N(0, 0.5)`` and random running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, BoundedBatchNorm2d):
                n = m.num_features
                gamma = torch.rand(n, generator=generator, dtype=torch.float64) * peak
                if signed:
                    gamma *= torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
                gamma[torch.rand(n, generator=generator) < tiny] *= 1e-6
                gamma[0] = 0.0
                if m.affine:
                    m.weight.copy_(gamma)
                    m.bias.copy_(torch.randn(n, generator=generator) * 0.5)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def outputs(model: nn.Module, x, training: bool, seed: int = 1):
    """``model(x)`` in the given mode with a fixed seed (dropout draws the same masks)."""
    model.train(training)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def assert_same_function(before: nn.Module, after: nn.Module, x, rtol: float = 1e-9) -> None:
    """Eval outputs, train outputs (batch statistics), then eval outputs again (the running statistics
    both updated in training) equal to ``rtol`` of the output's scale."""
    for training in (False, True, False):
        want, got = outputs(before, x, training), outputs(after, x, training)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"training={training}: {m}")


def converted_copy(model: nn.Module, convert, **kwargs):
    """``(original, converted)``: the conversion runs on a deep copy."""
    return model, convert(copy.deepcopy(model), **kwargs)
