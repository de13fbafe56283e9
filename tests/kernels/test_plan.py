"""The launch planner (``rnip_ext.kernels._plan``) without a GPU: its cache, and the three kernel
hazards of issue 21 checked over every benchmark shape as an H200 (132 SMs) would run it.

Plans are computed on ``meta`` tensors, which plan for ``_config.PLANNING_SM_COUNT`` SMs. Partial
traffic of a reduction: each chunk writes two ``[C]`` partials that the combine kernel reads back
once, i.e. ``4 K C`` values against the input's ``N C H W`` elements.
"""

import os
import sys

import pytest
import torch

from rnip_ext._backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
META = torch.device("meta")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def benchmark_shapes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bn_speed

    shapes = {tuple(s) for shapes in bn_speed.SHAPES.values() for s in shapes}
    # The issue's other examples: ResNet-50's stem and a huge-image small-batch layer.
    return sorted(shapes | {(64, 64, 112, 112), (2, 64, 512, 512), (256, 512, 7, 7)})


def meta_input(shape, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=META).contiguous(memory_format=fmt)


CASES = [(shape, dtype, cl) for shape in benchmark_shapes() for dtype in DTYPES for cl in (False, True)]


def test_plan_cache_hits_repeated_layouts_and_misses_changed_ones():
    from rnip_ext.kernels import _plan
    from rnip_ext.kernels._config import BNConfig

    _plan._CACHE.clear()
    x = meta_input((8, 16, 10, 10), torch.float32, False)
    first = _plan.plan(x)
    assert _plan.plan(torch.empty_like(x)) is first and len(_plan._CACHE) == 1  # hit: same layout
    others = [
        meta_input((8, 16, 10, 10), torch.float32, True),  # strides (channels_last)
        meta_input((8, 16, 10, 10), torch.float16, False),  # dtype
        meta_input((9, 16, 10, 10), torch.float32, False),  # shape
        torch.empty((8, 16, 10, 10)),  # device
    ]
    for other in others:
        assert _plan.plan(other) is not first
    assert _plan.plan(x, BNConfig(block_c=2, block_m=8, red_block_m=8)) is not first  # config
    assert len(_plan._CACHE) == 6
    _plan._CACHE.clear()


def test_launchers_plan_once_per_call(monkeypatch):
    """A training step looks its plan up (a dictionary hit) and builds nothing once cached."""
    from rnip_ext.kernels import _plan, bn_train
    from rnip_ext.kernels._variants import recorded_launches

    built = []
    original = _plan.plan_for
    monkeypatch.setattr(_plan, "plan_for", lambda *a, **k: built.append(a) or original(*a, **k))
    x = meta_input((16, 32, 8, 8), torch.float16, True)
    w, running = torch.empty(32, device=META), (torch.empty(32, device=META), torch.empty(32, device=META))
    for _ in range(3):
        with recorded_launches(run=False):
            y, mean, var, _ = bn_train.train_forward(x, w, None, 1e-5, 0.0, False, running=running)
            bn_train.train_backward(y, x, mean, var, w, None, 1e-5, 0.0, True, (True, True, False))
    assert len(built) <= 1


@pytest.mark.parametrize("shape,dtype,cl", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_partial_traffic_is_a_few_percent_of_the_input(shape, dtype, cl):
    """Hazard 1: reduction partials (written once, read once by a separate combine kernel) stay
    within 3.2% of the input for every benchmark shape, layout and dtype."""
    from rnip_ext.kernels import _plan

    p = _plan.plan(meta_input(shape, dtype, cl))
    n, c, h, w = shape
    for reduction in (p.stats, p.sums):
        assert 4 * reduction.num_chunks * c <= 0.032 * n * c * h * w, (reduction.num_chunks, shape)


@pytest.mark.parametrize("shape", benchmark_shapes(), ids=lambda s: "x".join(map(str, s)))
def test_nchw_reductions_fill_the_gpu(shape):
    """Hazard 2: NCHW reductions on the chunked path launch >= 2 x 132 programs (8x16x256x256 got
    8, 2x64x512x512 16, before row-block chunks)."""
    from rnip_ext.kernels import _plan

    for dtype in DTYPES:
        p = _plan.plan(meta_input(shape, dtype, False))
        if p.single is not None:
            continue
        for reduction in (p.stats, p.sums):
            assert reduction.partials.programs >= 2 * 132, (shape, dtype, reduction.partials.grid)


@pytest.mark.parametrize("shape", benchmark_shapes(), ids=lambda s: "x".join(map(str, s)))
def test_channels_last_single_pass_loads_fill_a_sector(shape):
    """Hazard 3: a channels_last single-pass program reads >= 32 contiguous bytes per position
    (or all channels): narrower channel blocks take the chunked path."""
    from rnip_ext.kernels import _plan

    for dtype in DTYPES:
        p = _plan.plan(meta_input(shape, dtype, True))
        if p.single is not None:
            block_c = p.single.consts[0]
            assert block_c * torch.empty((), dtype=dtype).element_size() >= 32 or block_c >= shape[1], (shape, dtype)


def test_hazard_shapes_route_as_the_issue_asks():
    from rnip_ext.kernels import _plan

    def plan(shape, dtype=torch.float32, cl=False):
        return _plan.plan(meta_input(shape, dtype, cl))

    # The AOT record's scalar-load cases now go chunked in channels_last, stay single in NCHW.
    for shape in ((128, 256, 8, 8), (128, 512, 4, 4)):
        assert plan(shape, cl=True).single is None and plan(shape).single is not None
    assert plan((128, 512, 2, 2), cl=True).single.consts[0] == 8  # 8 fp32 channels: 32 bytes
    assert plan((128, 512, 2, 2), torch.float16, cl=True).single.consts[0] == 16
    # Small batches of large images: row-block chunks.
    assert plan((8, 16, 256, 256)).stats.partials.programs >= 264
    assert plan((2, 64, 512, 512)).sums.partials.programs >= 264
