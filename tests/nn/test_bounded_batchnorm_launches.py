"""How much one BoundedBatchNorm2d training step issues on the Triton path (interpreter on CPU).

Counts the Triton kernel launches (each kernel's ``run`` is wrapped) and the other ATen operations
that would launch a GPU kernel (torch profiler events, nested ones included, minus allocations and
views) for one layer's training step: forward, ``reg()``, backward. The issue's limits:
single-pass path 1 + 1 launches, chunked 3 + 3 (statistics partials, their combine -- which
also updates the running statistics, so no separate ops for them -- and the normalise; issue 21
moved the combine out of the normalise kernel, which had re-merged every partial in every
program), and at most 5 other ATen operations per step.
"""

import os

_DEVICE = os.environ.get("RNIP_TEST_DEVICE", "cpu")
if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import rnip_ext  # noqa: E402
from rnip_ext._backend import triton_available  # noqa: E402
from rnip_ext.app.measure import kernel_launching_ops  # noqa: E402
from rnip_ext.kernels._variants import all_kernels, internals_supported  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(triton_available() and not internals_supported(),
                       reason="counting launches/variants uses Triton internals checked from triton 3.6 on"),
]
DEVICE = torch.device(_DEVICE)

def _count_step(monkeypatch, shape, momentum, channels_last=False):
    """``(forward launches, backward launches, kernel-launching ATen ops)`` of one training step."""
    layer = rnip_ext.BoundedBatchNorm2d(shape[1], momentum=momentum, device=DEVICE, backend="triton")
    # The paper's formulation is the one the fused record computes; the layer-normalised default
    # runs as eager autograd on C-element vectors (see RecedingRegularizer) and is not counted here.
    reg = rnip_ext.RecedingRegularizer(nn.Sequential(layer), strength=1e-3, shift=3.0, normalize=None)
    x = torch.randn(shape, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(x)
    one = torch.ones((), device=DEVICE)
    launches = []
    for kernel in all_kernels():
        original = kernel.run

        def counted(*args, _original=original, _name=kernel.__name__, **kwargs):
            launches.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    for _ in range(2):  # the second step is the one measured (first-call setup excluded)
        launches.clear()
        x.grad = None
        layer.weight.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = layer(x)
            forward_launches = len(launches)
            torch.autograd.backward([y, reg()], [dy, one])
    backward_launches = len(launches) - forward_launches
    # Count an op once, not the ops it calls; inside our ops the only ATen work is allocation
    # (plus the interpreter's own bookkeeping on CPU, which a GPU does not do).
    aten = kernel_launching_ops(prof.events(), owners=("aten::", "rnip_ext::"))
    return forward_launches, backward_launches, aten, layer


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_single_pass_step_is_one_launch_each_way(monkeypatch, channels_last):
    fwd, bwd, aten, layer = _count_step(monkeypatch, (4, 8, 4, 4), 0.1, channels_last)
    assert (fwd, bwd) == (1, 1)
    assert len(aten) <= 5, aten
    assert layer.num_batches_tracked.item() == 2  # counted in-kernel, once per step


def test_chunked_step_launch_budget(monkeypatch):
    """A slice too large for one program (2 x 128 x 128 positions): 3 + 3 launches."""
    fwd, bwd, aten, layer = _count_step(monkeypatch, (2, 2, 128, 128), 0.1)
    assert (fwd, bwd) == (3, 3)
    assert len(aten) <= 5, aten
    assert layer.num_batches_tracked.item() == 2


def test_cumulative_average_adds_one_in_place_count(monkeypatch):
    """momentum=None: the count the kernels divide by is incremented inside the op, just before
    the launch (every program reads it, so no program may write it): one extra ``add_``."""
    import rnip_ext.kernels._launch as launch

    adds = []
    original = launch.running_mode

    def spy(running, momentum, num_batches_tracked, n_pos):
        before = num_batches_tracked.item() if num_batches_tracked is not None else None
        out = original(running, momentum, num_batches_tracked, n_pos)
        if before is not None and num_batches_tracked.item() == before + 1:
            adds.append(n_pos)
        return out

    from rnip_ext.kernels import bn_single

    monkeypatch.setattr(bn_single, "running_mode", spy)
    fwd, bwd, aten, layer = _count_step(monkeypatch, (4, 8, 4, 4), None)
    assert (fwd, bwd) == (1, 1)
    assert len(aten) + len(adds) // 2 <= 6 and len(adds) == 2, (aten, adds)  # 2 steps ran
    assert layer.num_batches_tracked.item() == 2
