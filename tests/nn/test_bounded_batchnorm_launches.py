"""How much one BoundedBatchNorm2d training step issues on the Triton path (interpreter on CPU).

Counts the Triton kernel launches (each kernel's ``run`` is wrapped) and the other ATen operations
that would launch a GPU kernel (torch profiler events, nested ones included, minus allocations and
views) for one layer's training step: forward, ``reg()``, backward. The issue's limits:
single-pass path 1 + 1 launches, chunked 2 + 3 (the normalise-with-combine kernel updates the
running statistics, so no separate ops for them), and at most 5 other ATen operations per step.
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

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = torch.device(_DEVICE)

# ATen ops that allocate or re-view memory without launching a kernel.
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
    "aten::new_empty_strided", "aten::view", "aten::expand", "aten::as_strided", "aten::detach",
    "aten::alias", "aten::_unsafe_view", "aten::select", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::slice", "aten::unbind", "aten::t", "aten::reshape", "aten::lift_fresh",
    "aten::resize_", "aten::_reshape_alias", "aten::contiguous", "aten::to", "aten::result_type",
}  # fmt: skip


def _kernels():
    from rnip_ext.kernels import bn_backward, bn_chunked, bn_normalize, bn_single, bn_stats

    return [
        bn_chunked._bn_normalize_combine_kernel,
        bn_stats._bn_partial_stats_kernel, bn_stats._bn_combine_stats_kernel,
        bn_normalize._bn_normalize_kernel, bn_backward._bn_bwd_partial_kernel,
        bn_backward._bn_bwd_combine_kernel, bn_backward._bn_bwd_dx_kernel,
        bn_single._bn_fwd_single_kernel, bn_single._bn_bwd_single_kernel,
    ]  # fmt: skip


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
    for kernel in _kernels():
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
    aten = []
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in _NO_KERNEL:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", "rnip_ext::")):
            parent = parent.cpu_parent
        # Count an op once, not the ops it calls; inside our ops the only ATen work is
        # allocation (plus the interpreter's own bookkeeping on CPU, which a GPU does not do).
        if parent is None:
            aten.append(event.name)
    return forward_launches, backward_launches, aten, layer


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_single_pass_step_is_one_launch_each_way(monkeypatch, channels_last):
    fwd, bwd, aten, layer = _count_step(monkeypatch, (4, 8, 4, 4), 0.1, channels_last)
    assert (fwd, bwd) == (1, 1)
    assert len(aten) <= 5, aten
    assert layer.num_batches_tracked.item() == 2  # counted in-kernel, once per step


def test_chunked_step_launch_budget(monkeypatch):
    """A slice too large for one program (2 x 128 x 128 positions): 2 + 3 launches."""
    fwd, bwd, aten, layer = _count_step(monkeypatch, (2, 2, 128, 128), 0.1)
    assert (fwd, bwd) == (2, 3)
    assert len(aten) <= 5, aten
    assert layer.num_batches_tracked.item() == 2


def test_cumulative_average_adds_one_in_place_count(monkeypatch):
    """momentum=None: the count the kernels divide by is incremented inside the op, just before
    the launch (every program reads it, so no program may write it): one extra ``add_``."""
    import rnip_ext.kernels._launch as launch

    adds = []
    original = launch.running_args

    def spy(running, momentum, num_batches_tracked, placeholder, n_pos):
        before = num_batches_tracked.item() if num_batches_tracked is not None else None
        out = original(running, momentum, num_batches_tracked, placeholder, n_pos)
        if before is not None and num_batches_tracked.item() == before + 1:
            adds.append(n_pos)
        return out

    from rnip_ext.kernels import bn_single

    monkeypatch.setattr(bn_single, "running_args", spy)
    fwd, bwd, aten, layer = _count_step(monkeypatch, (4, 8, 4, 4), None)
    assert (fwd, bwd) == (1, 1)
    assert len(aten) + len(adds) // 2 <= 6 and len(adds) == 2, (aten, adds)  # 2 steps ran
    assert layer.num_batches_tracked.item() == 2
