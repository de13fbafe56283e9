"""channel_gather / channel_gather_many against advanced indexing, on the compiled op and on the
index_select fallback: every dtype, rank, layout and index kind, bad inputs, autograd, fake tensors,
torch.compile, and the CUDA kernel when a GPU is present."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from rnip_ext.ops import HAS_C_EXT, channel_gather, channel_gather_many

# The submodule, not the function that rnip_ext.ops re-exports under the same name.
cg = importlib.import_module("rnip_ext.ops.channel_gather")

needs_c = pytest.mark.skipif(not HAS_C_EXT, reason="the compiled op rnip_ext._C is not built/loaded")
PATHS = [pytest.param(True, id="c_ext", marks=needs_c), pytest.param(False, id="fallback")]

DTYPES = [
    torch.bool,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,  # the 16-byte copy path
]
SHAPES = {1: (7,), 2: (6, 5), 3: (5, 4, 3), 4: (6, 5, 3, 3), 5: (4, 3, 2, 3, 2)}
LAYOUTS = ["contiguous", "channels_last", "reversed", "strided", "broadcast"]


def reference(src, out_index, in_index):
    """The trusted answer: advanced indexing (not index_select, which the fallback uses)."""
    out = src
    if out_index is not None:
        out = out[out_index.long()]
    if in_index is not None:
        out = out[:, in_index.long()]
    return out


def random_values(shape, dtype, device="cpu"):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, device=device).to(dtype)
    lo = 0 if dtype == torch.uint8 else -100
    return torch.randint(lo, 100, shape, device=device).to(dtype)


def make_src(shape, dtype, layout, device="cpu"):
    """A tensor of `shape` whose strides follow `layout` (never silently contiguous when the layout
    asks otherwise, except where the rank makes it impossible)."""
    ndim = len(shape)
    if layout == "contiguous":
        return random_values(shape, dtype, device)
    if layout == "channels_last":
        if ndim == 4:
            return random_values(shape, dtype, device).to(memory_format=torch.channels_last)
        if ndim == 5:
            return random_values(shape, dtype, device).to(memory_format=torch.channels_last_3d)
        layout = "reversed"
    if layout == "reversed":
        # Storage order with the dims reversed: dim 0 has unit stride.
        return random_values(shape[::-1], dtype, device).permute(*reversed(range(ndim)))
    if layout == "strided":
        big = random_values(tuple(2 * s + 1 for s in shape), dtype, device)
        return big[tuple(slice(1, None, 2) for _ in shape)]
    if layout == "broadcast":
        # A stride-0 trailing dim (or dim 0 for 1-D tensors).
        dim = ndim - 1
        narrow = list(shape)
        narrow[dim] = 1
        return random_values(tuple(narrow), dtype, device).expand(*shape)
    raise AssertionError(layout)


def index_cases(size, device="cpu"):
    """Index kinds along a dim of `size`: None, sorted subset, unsorted with duplicates, empty,
    int32, a strided (non-contiguous) view."""
    perm = torch.randperm(size, device=device)
    keep = perm[: max(1, size // 2)].sort().values
    dup = torch.cat([perm[:2], perm[:1], perm[-1:]])
    wide = torch.arange(size, device=device).repeat_interleave(2).flip(0)
    return {
        "none": None,
        "subset": keep,
        "dup": dup,
        "empty": torch.empty(0, dtype=torch.long, device=device),
        "int32": dup.to(torch.int32),
        "strided": wide[::2],
    }


def assert_gather_equal(out, src, out_index, in_index):
    expected = reference(src, out_index, in_index)
    assert out.dtype == src.dtype
    assert out.shape == expected.shape
    assert out.is_contiguous()
    assert torch.equal(out, expected)
    if out.numel() > 0 and src.numel() > 0:
        assert out.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()


class RecordOps(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher's Python mode."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("use_c_ext", PATHS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ndim", [1, 2, 3, 4, 5])
def test_matches_indexing(use_c_ext, ndim, dtype, layout):
    src = make_src(SHAPES[ndim], dtype, layout)
    outs = index_cases(src.shape[0])
    ins = index_cases(src.shape[1]) if ndim >= 2 else {"none": None}
    for out_index in outs.values():
        for in_index in ins.values():
            got = cg._channel_gather(src, out_index, in_index, use_c_ext=use_c_ext)
            assert_gather_equal(got, src, out_index, in_index)


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_public_functions_use_the_module_switch(use_c_ext, monkeypatch):
    monkeypatch.setattr(cg, "_USE_C_EXT", use_c_ext)
    src = torch.randn(5, 4, 3)
    out_index, in_index = torch.tensor([4, 0]), torch.tensor([3, 3, 1])
    with RecordOps() as rec:
        one = channel_gather(src, out_index, in_index)
        many = channel_gather_many([src, src[0]], [out_index, in_index], [in_index, None])
    ours = [name for name in rec.names if name.startswith("rnip_ext.")]
    if use_c_ext:
        assert ours == ["rnip_ext.channel_gather.default", "rnip_ext.channel_gather_many.default"], rec.names
    else:
        assert ours == [], rec.names
        assert "aten.index_select.default" in rec.names, rec.names
    assert_gather_equal(one, src, out_index, in_index)
    assert_gather_equal(many[0], src, out_index, in_index)
    assert_gather_equal(many[1], src[0], in_index, None)


@pytest.mark.parametrize("use_c_ext", PATHS)
@pytest.mark.parametrize(
    "shape, out_index, in_index, expected_shape",
    [
        ((0, 3), None, None, (0, 3)),
        ((0, 3, 2), torch.empty(0, dtype=torch.long), torch.tensor([2, 0]), (0, 2, 2)),
        ((4, 0, 3), torch.tensor([1, 1]), torch.empty(0, dtype=torch.int32), (2, 0, 3)),
        ((4, 5, 0), torch.tensor([3]), torch.tensor([4, 0]), (1, 2, 0)),
        ((4,), torch.empty(0, dtype=torch.long), None, (0,)),
        ((4, 5, 3, 3), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), (0, 0, 3, 3)),
    ],
)
def test_empty_results(use_c_ext, shape, out_index, in_index, expected_shape):
    src = torch.randn(shape)
    got = cg._channel_gather(src, out_index, in_index, use_c_ext=use_c_ext)
    assert got.shape == expected_shape
    assert got.is_contiguous()
    (got_many,) = cg._channel_gather_many([src], [out_index], [in_index], use_c_ext=use_c_ext)
    assert got_many.shape == expected_shape


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_large_rows_and_chunk_boundaries(use_c_ext):
    # Outputs of several 64 KiB chunks: rows split across chunks, chunks spanning rows, and (in the
    # many-form) chunks of different tensors handed to different threads.
    big_rows = torch.randn(3, 4, 70_000)
    linear = torch.randn(300, 400, dtype=torch.float64).t()
    conv = torch.randn(64, 48, 3, 3, dtype=torch.float16).to(memory_format=torch.channels_last)
    srcs = [big_rows, linear, conv, torch.randn(10)]
    out_indices = [torch.tensor([2, 0, 2]), torch.randperm(400)[:333], torch.randperm(64)[:40], None]
    in_indices = [torch.tensor([3, 1]), torch.randperm(300)[:211].int(), torch.randperm(48)[:30], None]
    many = cg._channel_gather_many(srcs, out_indices, in_indices, use_c_ext=use_c_ext)
    for got, src, o, i in zip(many, srcs, out_indices, in_indices):
        assert_gather_equal(got, src, o, i)
        assert_gather_equal(cg._channel_gather(src, o, i, use_c_ext=use_c_ext), src, o, i)


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_many_mixed_dtypes_and_layouts(use_c_ext):
    srcs, out_indices, in_indices = [], [], []
    for k, dtype in enumerate(DTYPES):
        ndim = 1 + k % 5
        src = make_src(SHAPES[ndim], dtype, LAYOUTS[k % len(LAYOUTS)])
        outs = list(index_cases(src.shape[0]).values())
        ins = list(index_cases(src.shape[1]).values()) if ndim >= 2 else [None]
        srcs.append(src)
        out_indices.append(outs[k % len(outs)])
        in_indices.append(ins[(k + 1) % len(ins)])
    many = cg._channel_gather_many(srcs, out_indices, in_indices, use_c_ext=use_c_ext)
    assert len(many) == len(srcs)
    for got, src, o, i in zip(many, srcs, out_indices, in_indices):
        assert_gather_equal(got, src, o, i)


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_many_accepts_tuples_and_empty_lists(use_c_ext):
    src = torch.randn(4, 3)
    got = cg._channel_gather_many((src,), (torch.tensor([1]),), (None,), use_c_ext=use_c_ext)
    assert isinstance(got, list) and torch.equal(got[0], src[[1]])
    assert cg._channel_gather_many([], [], [], use_c_ext=use_c_ext) == []


@given(data=st.data())
@settings(max_examples=50, deadline=None)
def test_property_random_shapes_and_strides(data):
    ndim = data.draw(st.integers(1, 4), label="ndim")
    shape = data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim), label="shape")
    steps = data.draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim), label="steps")
    order = data.draw(st.permutations(range(ndim)), label="storage order")
    dtype = data.draw(st.sampled_from([torch.bool, torch.int8, torch.int32, torch.float16, torch.float64]))
    # Allocate with dims in `order`, permute back, then slice with `steps`: arbitrary strides.
    full = [s * k for s, k in zip(shape, steps)]
    base = random_values(tuple(full[d] for d in order), dtype)
    src = base.permute(*[order.index(d) for d in range(ndim)])[tuple(slice(None, None, k) for k in steps)]
    assert tuple(src.shape) == tuple(shape)

    def draw_index(size, label):
        if data.draw(st.booleans(), label=f"{label} is None"):
            return None
        values = data.draw(st.lists(st.integers(0, size - 1), max_size=2 * size), label=label)
        index_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]), label=f"{label} dtype")
        return torch.tensor(values, dtype=index_dtype)

    out_index = draw_index(shape[0], "out_index")
    in_index = draw_index(shape[1], "in_index") if ndim >= 2 else None
    for use_c_ext in [True, False] if HAS_C_EXT else [False]:
        got = cg._channel_gather(src, out_index, in_index, use_c_ext=use_c_ext)
        assert_gather_equal(got, src, out_index, in_index)


# ------------------------------------------------------------------------------------------------
# Bad inputs

BAD_SINGLE = [
    # (src, out_index, in_index, error, match)
    (torch.tensor(1.0), None, None, ValueError, "src must have at least 1 dimension"),
    (torch.randn(4, 3), torch.tensor([[0, 1]]), None, ValueError, "out_index must be 1-D, got a 2-D"),
    (torch.randn(4, 3), torch.tensor(1), None, ValueError, "out_index must be 1-D, got a 0-D"),
    (torch.randn(4, 3), None, torch.zeros(2, 2, dtype=torch.long), ValueError, "in_index must be 1-D"),
    (torch.randn(4, 3), torch.tensor([0.0, 1.0]), None, TypeError, "out_index must be int64 or int32"),
    (torch.randn(4, 3), None, torch.tensor([True]), TypeError, "in_index must be int64 or int32"),
    (torch.randn(4, 3), None, torch.tensor([1], dtype=torch.int16), TypeError, "in_index must be int64 or int32"),
    (torch.randn(4, 3), torch.tensor([0, 4]), None, ValueError, r"out_index\[1\] = 4 is out of range \[0, 4\)"),
    (torch.randn(4, 3), torch.tensor([-1]), None, ValueError, r"out_index\[0\] = -1 is out of range"),
    (torch.randn(4, 3), None, torch.tensor([2, 3], dtype=torch.int32), ValueError, r"in_index\[1\] = 3 is out"),
    (torch.randn(4, 3), None, torch.tensor([0, -3]), ValueError, r"in_index\[1\] = -3 is out of range"),
    (torch.randn(4), None, torch.tensor([0]), ValueError, "in_index was given but src is 1-D"),
    (torch.randn(4, 3), torch.tensor([0], device="meta"), None, ValueError, "out_index is on meta but src is on cpu"),
]


@pytest.mark.parametrize("use_c_ext", PATHS)
@pytest.mark.parametrize("src, out_index, in_index, error, match", BAD_SINGLE)
def test_bad_inputs_wrapper(use_c_ext, src, out_index, in_index, error, match):
    with pytest.raises(error, match=match):
        cg._channel_gather(src, out_index, in_index, use_c_ext=use_c_ext)


@pytest.mark.parametrize("use_c_ext", PATHS)
@pytest.mark.parametrize(
    "src, out_index, in_index, error, match",
    [
        ([1.0, 2.0], None, None, TypeError, "src must be a torch.Tensor, got list"),
        (torch.randn(4, 3), [0, 1], None, TypeError, "out_index must be a torch.Tensor or None, got list"),
        (torch.randn(4, 3).to_sparse(), None, None, ValueError, "src must be a strided"),
    ],
)
def test_bad_python_objects(use_c_ext, src, out_index, in_index, error, match):
    with pytest.raises(error, match=match):
        cg._channel_gather(src, out_index, in_index, use_c_ext=use_c_ext)


@needs_c
@pytest.mark.parametrize("src, out_index, in_index, error, match", BAD_SINGLE)
def test_bad_inputs_compiled_op(src, out_index, in_index, error, match):
    # The op's own checks (TORCH_CHECK_VALUE/_TYPE) raise the same Python types and messages.
    with pytest.raises(error, match=match):
        torch.ops.rnip_ext.channel_gather(src, out_index, in_index)


@needs_c
def test_compiled_op_checks_values_when_wrapper_does_not():
    with pytest.raises(ValueError, match=r"out_index\[2\] = 9 is out of range"):
        cg._channel_gather(torch.randn(5, 2), torch.tensor([0, 1, 9]), None, use_c_ext=True, check_values=False)


BAD_MANY = [
    # (srcs, out_indices, in_indices, error, match)
    ([torch.randn(3)], [], [None], ValueError, "out_indices has 0 entries but srcs has 1"),
    ([torch.randn(3)], [None], [None, None], ValueError, "in_indices has 2 entries but srcs has 1"),
    (
        [torch.randn(3), torch.randn(3, 2)],
        [None, torch.tensor([[1]])],
        [None, None],
        ValueError,
        r"out_indices\[1\] must be 1-D",
    ),
    (
        [torch.randn(3, 2), torch.randn(3, 2)],
        [None, None],
        [None, torch.tensor([0, 2])],
        ValueError,
        r"in_indices\[1\]\[1\] = 2 is out of range \[0, 2\) of dim 1 of srcs\[1\]",
    ),
    ([torch.randn(3), torch.randn(3)], [None, None], [None, torch.tensor([0])], ValueError, r"in_indices\[1\] was"),
    ([torch.randn(2), torch.tensor(2.0)], [None, None], [None, None], ValueError, r"srcs\[1\] must have at least"),
    ([torch.randn(2)], [torch.tensor([0.5])], [None], TypeError, r"out_indices\[0\] must be int64 or int32"),
    (
        [torch.randn(2), torch.randn(2, device="meta")],
        [None, None],
        [None, None],
        ValueError,
        r"srcs\[1\] is on meta but srcs\[0\] is on cpu",
    ),
]


@pytest.mark.parametrize("use_c_ext", PATHS)
@pytest.mark.parametrize("srcs, out_indices, in_indices, error, match", BAD_MANY)
def test_bad_inputs_many_wrapper(use_c_ext, srcs, out_indices, in_indices, error, match):
    with pytest.raises(error, match=match):
        cg._channel_gather_many(srcs, out_indices, in_indices, use_c_ext=use_c_ext)


@needs_c
@pytest.mark.parametrize("srcs, out_indices, in_indices, error, match", BAD_MANY[:-1])
def test_bad_inputs_many_compiled_op(srcs, out_indices, in_indices, error, match):
    # (The mixed-device case never reaches a kernel: the dispatcher picks meta, whose fake kernel
    # is the Python check already covered above.)
    with pytest.raises(error, match=match):
        torch.ops.rnip_ext.channel_gather_many(srcs, out_indices, in_indices)


def test_bad_list_types():
    with pytest.raises(TypeError, match="srcs must be a list or tuple, got Tensor"):
        channel_gather_many(torch.randn(3, 2), [None], [None])
    with pytest.raises(TypeError, match="in_indices must be a list or tuple, got NoneType"):
        channel_gather_many([torch.randn(3, 2)], [None], None)


# ------------------------------------------------------------------------------------------------
# Autograd, fake tensors, torch.library checks, torch.compile


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_gradcheck_with_duplicates(use_c_ext):
    src = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    out_index = torch.tensor([4, 0, 4, 4])
    in_index = torch.tensor([1, 1, 3], dtype=torch.int32)

    def one(x):
        return cg._channel_gather(x, out_index, in_index, use_c_ext=use_c_ext)

    def many(x):
        parts = [x, x[:, :, 0], x[0, 0]]
        out_indices = [out_index, None, torch.tensor([2, 2, 0])]
        return cg._channel_gather_many(parts, out_indices, [in_index, in_index, None], use_c_ext=use_c_ext)

    assert torch.autograd.gradcheck(one, (src,))
    assert torch.autograd.gradgradcheck(one, (src,))
    assert torch.autograd.gradcheck(many, (src,))


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_backward_accumulates_duplicates(use_c_ext):
    src = torch.zeros(3, 2, 2, requires_grad=True)
    out = cg._channel_gather(src, torch.tensor([2, 2, 2, 0]), torch.tensor([1, 1]), use_c_ext=use_c_ext)
    out.backward(torch.ones_like(out))
    expected = torch.zeros(3, 2, 2)
    expected[2, 1] = 6.0  # 3 copies of row 2 x 2 copies of column 1
    expected[0, 1] = 2.0
    assert torch.equal(src.grad, expected)


@needs_c
def test_many_backward_skips_integer_sources():
    weight = torch.randn(4, 3, requires_grad=True)
    counts = torch.arange(4)
    outs = channel_gather_many([weight, counts], [torch.tensor([1, 3]), torch.tensor([0])], [None, None])
    assert outs[1].requires_grad is False
    outs[0].sum().backward()
    assert torch.equal(weight.grad, torch.tensor([[0.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3]))


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32], ids=str)
def test_opcheck(dtype):
    grad = dtype.is_floating_point
    src = random_values((6, 5, 3), dtype).requires_grad_(grad)
    vec = random_values((6,), dtype).requires_grad_(grad)
    out_index, in_index = torch.tensor([5, 0, 0]), torch.tensor([4, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.rnip_ext.channel_gather.default, (src, out_index, in_index))
    torch.library.opcheck(torch.ops.rnip_ext.channel_gather.default, (src, None, None))
    torch.library.opcheck(
        torch.ops.rnip_ext.channel_gather_many.default, ([src, vec], [out_index, out_index], [in_index, None])
    )
    torch.library.opcheck(
        torch.ops.rnip_ext.channel_gather_many.default, ([src, vec], [None, out_index], [in_index, None])
    )


@needs_c
def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        src = torch.empty(8, 6, 3, 3).to(memory_format=torch.channels_last)
        out_index = torch.empty(5, dtype=torch.long)
        in_index = torch.empty(2, dtype=torch.int32)
        one = channel_gather(src, out_index, in_index)
        many = channel_gather_many([src, torch.empty(8, dtype=torch.float16)], [None, out_index], [in_index, None])
    assert one.shape == (5, 2, 3, 3) and one.is_contiguous()
    assert many[0].shape == (8, 2, 3, 3) and many[0].is_contiguous()
    assert many[1].shape == (5,) and many[1].dtype == torch.float16
    meta = torch.ops.rnip_ext.channel_gather(torch.empty(4, 3, device="meta"), None, torch.tensor([0], device="meta"))
    assert meta.shape == (4, 1) and meta.device.type == "meta"


@pytest.mark.parametrize("use_c_ext", PATHS)
def test_compile_fullgraph(use_c_ext, monkeypatch):
    monkeypatch.setattr(cg, "_USE_C_EXT", use_c_ext)
    torch._dynamo.reset()
    out_index, in_index = torch.tensor([3, 1, 1]), torch.tensor([0, 2])

    def prune_and_use(w, v):
        pruned_w, pruned_v = channel_gather_many([w, v], [out_index, out_index], [in_index, None])
        return (channel_gather(w, out_index, in_index).sin() * pruned_v[:, None, None, None]).sum() + pruned_w.sum()

    compiled = torch.compile(prune_and_use, fullgraph=True, backend="aot_eager")
    w = torch.randn(4, 3, 2, 2, requires_grad=True)
    v = torch.randn(4, requires_grad=True)
    got = compiled(w, v)
    expected = prune_and_use(w, v)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got, (w, v))
    expected_grads = torch.autograd.grad(expected, (w, v))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@needs_c
def test_compile_inductor_channel_selection_layer():
    # The op as a channel-selection layer inside a compiled forward and backward.
    torch._dynamo.reset()
    keep = torch.tensor([0, 2, 5])
    conv = torch.nn.Conv2d(3, 6, 3)

    def forward(x):
        return torch.ops.rnip_ext.channel_gather(conv(x).transpose(0, 1), keep, None).relu().sum()

    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(forward, fullgraph=True)
    torch.testing.assert_close(compiled(x), forward(x))


# ------------------------------------------------------------------------------------------------
# Loading


def _run_python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_disable_env_var_forces_fallback():
    code = (
        "import torch, rnip_ext, rnip_ext.ops as ops\n"
        "assert ops.HAS_C_EXT is False\n"
        "x = torch.randn(5, 4)\n"
        "assert torch.equal(ops.channel_gather(x, torch.tensor([4, 4]), torch.tensor([1])), x[[4, 4]][:, [1]])\n"
        "print('ok')\n"
    )
    assert _run_python(code, RNIP_EXT_DISABLE_C="1").strip() == "ok"


def test_package_imports_without_compiled_op():
    code = (
        "import sys\n"
        "sys.modules['rnip_ext._C'] = None  # makes `from rnip_ext import _C` raise ImportError\n"
        "import torch, rnip_ext, rnip_ext.ops as ops\n"
        "assert ops.HAS_C_EXT is False\n"
        "x = torch.randn(3, 2, 2)\n"
        "assert torch.equal(ops.channel_gather_many([x], [torch.tensor([2])], [None])[0], x[[2]])\n"
        "print('ok')\n"
    )
    assert _run_python(code).strip() == "ok"


@needs_c
def test_python_custom_ops_share_the_namespace():
    # Triton ops are declared from Python under "rnip_ext::"; the C++ TORCH_LIBRARY block must not
    # stop that.
    @torch.library.custom_op("rnip_ext::channel_gather_test_probe", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    assert torch.equal(torch.ops.rnip_ext.channel_gather_test_probe(torch.zeros(2)), torch.ones(2))
    assert torch.equal(torch.ops.rnip_ext.channel_gather(torch.arange(3), torch.tensor([2]), None), torch.tensor([2]))


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCUDA:
    @pytest.mark.parametrize("use_c_ext", PATHS)
    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_matches_indexing(self, use_c_ext, dtype, layout):
        for ndim in (1, 2, 4, 5):
            src = make_src(SHAPES[ndim], dtype, layout, device="cuda")
            outs = index_cases(src.shape[0], device="cuda")
            ins = index_cases(src.shape[1], device="cuda") if ndim >= 2 else {"none": None}
            for out_index in outs.values():
                for in_index in ins.values():
                    got = cg._channel_gather(src, out_index, in_index, use_c_ext=use_c_ext)
                    assert got.device == src.device
                    assert_gather_equal(got, src, out_index, in_index)

    @pytest.mark.parametrize("use_c_ext", PATHS)
    def test_many_every_element_size_and_many_tiles(self, use_c_ext):
        srcs = [
            torch.randn(512, 256, 3, 3, device="cuda").to(memory_format=torch.channels_last),
            torch.randn(1000, 2048, device="cuda", dtype=torch.bfloat16),
            random_values((64, 32, 3, 3), torch.bool, "cuda"),
            torch.randn(300, 7, device="cuda", dtype=torch.complex128),
            torch.randn(50, device="cuda", dtype=torch.float64),
            torch.randn(0, 3, device="cuda"),
        ]
        out_indices = [torch.randperm(512, device="cuda")[:200], None, torch.tensor([63, 0, 0], device="cuda"),
                       torch.randperm(300, device="cuda")[:17].int(), torch.tensor([49, 1], device="cuda"), None]
        in_indices = [torch.randperm(256, device="cuda")[:100].sort().values,
                      torch.randperm(2048, device="cuda")[:1500], None,
                      torch.tensor([6, 6], device="cuda"), None, torch.tensor([2], device="cuda")]
        many = cg._channel_gather_many(srcs, out_indices, in_indices, use_c_ext=use_c_ext)
        for got, src, o, i in zip(many, srcs, out_indices, in_indices):
            assert_gather_equal(got, src, o, i)

    @pytest.mark.skipif(not cg._C_HAS_CUDA, reason="rnip_ext._C was built without its CUDA kernel")
    def test_uses_the_cuda_kernel(self):
        src = torch.randn(8, 4, 3, device="cuda")
        with RecordOps() as rec:
            got = channel_gather(src, torch.tensor([7, 1], device="cuda"), None)
        assert any(name.startswith("rnip_ext.channel_gather") for name in rec.names), rec.names
        assert torch.equal(got, src[[7, 1]])

    @pytest.mark.parametrize("use_c_ext", PATHS)
    def test_out_of_range_raises_before_launch(self, use_c_ext):
        src = torch.randn(4, 3, device="cuda")
        with pytest.raises(ValueError, match=r"in_index\[0\] = 3 is out of range"):
            cg._channel_gather(src, None, torch.tensor([3], device="cuda"), use_c_ext=use_c_ext)
        with pytest.raises(ValueError, match="out_index is on cpu but src is on cuda"):
            cg._channel_gather(src, torch.tensor([0]), None, use_c_ext=use_c_ext)

    @pytest.mark.parametrize("use_c_ext", PATHS)
    def test_gradcheck(self, use_c_ext):
        src = torch.randn(5, 4, 3, dtype=torch.float64, device="cuda", requires_grad=True)
        out_index = torch.tensor([4, 0, 4], device="cuda")
        in_index = torch.tensor([1, 1, 3], device="cuda", dtype=torch.int32)
        assert torch.autograd.gradcheck(
            lambda x: cg._channel_gather(x, out_index, in_index, use_c_ext=use_c_ext), (src,)
        )

    @pytest.mark.skipif(not cg._C_HAS_CUDA, reason="rnip_ext._C was built without its CUDA kernel")
    def test_opcheck(self):
        src = torch.randn(6, 5, 3, device="cuda", requires_grad=True)
        out_index = torch.tensor([5, 0, 0], device="cuda")
        torch.library.opcheck(torch.ops.rnip_ext.channel_gather.default, (src, out_index, None))
        torch.library.opcheck(
            torch.ops.rnip_ext.channel_gather_many.default, ([src, src[0]], [out_index, None], [None, out_index])
        )

    @pytest.mark.skipif(not cg._C_HAS_CUDA, reason="rnip_ext._C was built without its CUDA kernel")
    def test_other_device_and_stream(self):
        # The device guard and current stream: tensors on the last GPU, work on a side stream.
        device = torch.device("cuda", torch.cuda.device_count() - 1)
        src = torch.randn(64, 32, 3, 3, device=device)
        index = torch.randperm(64, device=device)[:10]
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            got = channel_gather(src, index, index[:5] % 32)
        stream.synchronize()
        assert_gather_equal(got, src, index, index[:5] % 32)

    @pytest.mark.skipif(not cg._C_HAS_CUDA, reason="rnip_ext._C was built without its CUDA kernel")
    def test_bad_index_fails_a_device_assertion_that_is_reported(self):
        """An out-of-range index reaching the CUDA kernel unchecked fails its device assertion,
        which the CUDA runtime reports (a separate process: the failure poisons the context)."""
        code = (
            "import torch, rnip_ext\n"
            "src = torch.randn(4, 3, device='cuda')\n"
            "out = torch.ops.rnip_ext.channel_gather(src, torch.tensor([9], device='cuda'), None)\n"
            "torch.cuda.synchronize()\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert "device-side assert" in done.stderr or "index out of range" in done.stderr, done.stderr[-2000:]

    @pytest.mark.skipif(not cg._C_HAS_CUDA, reason="rnip_ext._C was built without its CUDA kernel")
    def test_gather_many_captures_in_a_cuda_graph(self):
        """No staging copy: a many-tensor gather (more tensors than one launch's batch) can be
        captured in a CUDA graph and replayed."""
        srcs = [torch.randn(32, 16, 3, 3, device="cuda") for _ in range(20)]
        index = torch.randperm(32, device="cuda")[:12]
        outs = channel_gather_many(srcs, [index] * 20, [None] * 20)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = torch.ops.rnip_ext.channel_gather_many(srcs, [index] * 20, [None] * 20)
        for s in srcs:
            s.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for got, s in zip(outs, srcs):
            assert torch.equal(got, s[index])
