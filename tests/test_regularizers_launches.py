"""How many ATen operations ``RecedingRegularizer.__call__`` issues per training step.

Counts the top-level ATen operations that would launch a GPU kernel (torch profiler events minus
allocations and views, an op counted once, not the ops it calls) of ``reg()`` forward + backward,
on the eager path (no fused record). The penalty is computed for all layers at once, so the count
must not grow with the number of layers. Bounds (measured on torch 2.13, with some room):
``normalize="layer"`` at most 45 ATen ops whatever the number of layers (41 measured),
``normalize=None`` at most 22 (20); 13 layers add at most one op (the concatenation of the logits) to 1 layer. Before
batching, 13 VGG-16 layers cost 525 (``"layer"``) and 200 (``None``) ops.
"""

import pytest
import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d, RecedingRegularizer
from rnip_ext.app.measure import kernel_launching_ops

VGG16_CIFAR_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
BOUND = {"layer": 45, None: 22}


def _count(widths, normalize, cost_weighted=False) -> list[str]:
    model = nn.Sequential(*[BoundedBatchNorm2d(c) for c in widths])
    reg = RecedingRegularizer(model, 1e-3, 3.0, normalize=normalize)
    if cost_weighted:
        reg.weights = torch.rand(len(widths)).add(0.5).tolist()
    for _ in range(2):  # the second call is the one counted (the layout is built on the first)
        for m in model:
            m.weight.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            reg().backward()
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in model)
    return kernel_launching_ops(prof.events())


@pytest.mark.parametrize("normalize", ["layer", None])
@pytest.mark.parametrize("cost_weighted", [False, True], ids=["channels", "cost_weighted"])
def test_op_count_does_not_grow_with_the_number_of_layers(normalize, cost_weighted):
    one = _count(VGG16_CIFAR_WIDTHS[:1], normalize, cost_weighted)
    thirteen = _count(VGG16_CIFAR_WIDTHS, normalize, cost_weighted)
    assert len(thirteen) <= BOUND[normalize], thirteen
    assert len(thirteen) - len(one) <= 1, (one, thirteen)  # only the concatenation of the logits
    assert len(_count((7,) * 40, normalize, cost_weighted)) == len(thirteen)
