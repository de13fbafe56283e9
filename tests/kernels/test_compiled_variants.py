"""No recompilation when the batch or image size changes (checked without a GPU).

Every launch of one layer's training step is recorded (under the interpreter on CPU, compiled
with ``RNIP_TEST_DEVICE=cuda``) and turned into the key Triton compiles a variant for: the
constexpr values, ``num_warps``, and the specialisation Triton's own ``specialize_impl`` gives
every other argument (dtype, ``== 1``, divisibility by 16, pointer alignment), honouring each
kernel's ``do_not_specialize``. Distinct keys per kernel = compiled variants.
"""

import os

_DEVICE = os.environ.get("RNIP_TEST_DEVICE", "cpu")
if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rnip_ext._backend import triton_available  # noqa: E402
from rnip_ext.kernels._variants import all_kernels, internals_supported, variant_key  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(triton_available() and not internals_supported(),
                       reason="counting launches/variants uses Triton internals checked from triton 3.6 on"),
]
DEVICE = torch.device(_DEVICE)


@pytest.fixture
def recorder(monkeypatch):
    """``{kernel name: set of variant keys}``, filled by every launch while the test runs."""
    seen = {}
    for kernel in all_kernels():
        original = kernel.run

        def run(*args, _kernel=kernel, _original=original, **kwargs):
            seen.setdefault(_kernel.fn.__name__, set()).add(variant_key(_kernel, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return seen


def _train_steps(shapes, channels, channels_last, momentum=0.1):
    import rnip_ext

    layer = rnip_ext.BoundedBatchNorm2d(channels, momentum=momentum, device=DEVICE, backend="triton")
    reg = rnip_ext.RecedingRegularizer(torch.nn.Sequential(layer), 1e-3, 3.0)
    for shape in shapes:
        x = torch.randn(shape, device=DEVICE)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = layer(x)
        torch.autograd.backward([y, reg()], [torch.randn_like(y), torch.ones((), device=DEVICE)])
        layer.weight.grad = None
    layer.eval()
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, device=DEVICE)
            layer(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_chunked_path_compiles_once_across_batch_sizes(recorder, channels_last):
    """Slices too large for one program (2 channels, 57x57 images): one variant per kernel
    whatever the batch size (the last, smaller batch of an epoch included)."""
    _train_steps([(4, 2, 57, 57), (3, 2, 57, 57), (16, 2, 57, 57), (5, 2, 57, 57)], 2, channels_last)
    assert "_bn_fwd_single_kernel" not in recorder  # the rule sends all of these to chunked
    for name, keys in recorder.items():
        assert len(keys) == 1, f"{name}: {len(keys)} compiled variants"
    assert {"_bn_partial_stats_kernel", "_bn_combine_stats_kernel", "_bn_bwd_dx_kernel",
            "_bn_normalize_kernel"} <= set(recorder)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_chunked_path_image_sizes_compile_at_most_two_variants(recorder, channels_last):
    """Image sizes: channels_last compiles once; NCHW once per class of the channel stride
    ``H*W`` (divisible by 16 or not), which stays specialised because the channels_last
    kernels need their unit channel stride known at compile time. (The NCHW elementwise
    kernels' image tiles add no class here: 64x64 and 48x48 are the 16-divisible ones and take
    the same 128-position, 4-aligned tiles; the odd sizes keep flat tiles.)"""
    shapes = [(4, 2, 64, 64), (3, 2, 57, 57), (2, 2, 45, 47), (5, 2, 33, 31), (2, 2, 48, 48)]
    _train_steps(shapes, 2, channels_last)
    for name, keys in recorder.items():
        assert len(keys) <= (1 if channels_last else 2), f"{name}: {len(keys)} compiled variants"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_single_pass_compiles_once_per_power_of_two_slice(recorder, channels_last):
    """Deep-layer shapes (8 channels, 4x4): batches 32, 30, 24, 17 share the 512-position tile
    (one variant); a batch whose slice crosses a power of two (8 -> 128 positions) adds one."""
    _train_steps([(32, 8, 4, 4), (30, 8, 4, 4), (24, 8, 4, 4), (17, 8, 4, 4)], 8, channels_last)
    assert len(recorder["_bn_fwd_single_kernel"]) == 1
    assert len(recorder["_bn_bwd_single_kernel"]) == 1
    _train_steps([(8, 8, 4, 4)], 8, channels_last)
    assert len(recorder["_bn_fwd_single_kernel"]) == 2
    assert len(recorder["_bn_bwd_single_kernel"]) == 2


def test_nchw_image_tiles_compile_once_per_class(recorder):
    """NCHW elementwise kernels tile images x ``BLOCK_HW`` positions (``_config.image_tiles``):
    every image with ``H*W > 64`` and the same power-of-two factor shares one variant (10x10,
    14x14, 18x18, 13x20: factor 4, 128-position rows), odd ``H*W`` whose bodies round to the
    same power of two one split variant (7x7, 5x11: bodies of at most 48 and 52 in 64-wide rows,
    ``_config.split_tiles``).
    ``H*W`` itself stays a runtime argument; smaller images add one variant per power of two."""
    from rnip_ext.kernels.bn_backward import backward_chunked as bn_backward
    from rnip_ext.kernels.bn_normalize import normalize as bn_normalize

    def run(sizes):
        for h, w in sizes:
            x = torch.randn(3, 2, h, w, device=DEVICE)
            mean, var = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
            bn_normalize(x, mean, var, None, None, 1e-5)
            bn_backward(torch.randn_like(x), x, mean, var, None, None, 1e-5, 0.0, False,
                        (True, False, False))  # fmt: skip

    run([(10, 10), (14, 14), (18, 18), (13, 20)])
    assert len(recorder["_bn_normalize_kernel"]) == 1
    assert len(recorder["_bn_bwd_dx_kernel"]) == 1
    run([(7, 7), (5, 11)])
    assert len(recorder["_bn_normalize_kernel"]) == 2
    assert len(recorder["_bn_bwd_dx_kernel"]) == 2
