"""The bounded-BN Triton launchers against the float64 eager reference (``rnip_ext.functional``).

Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set below before any
kernel module is imported: Triton reads it when a kernel is defined). With
``RNIP_TEST_DEVICE=cuda`` the same tests run compiled on the GPU instead.

Shapes are small (the interpreter runs every program in Python); a tiny configuration forces many
tiles, chunks and channel blocks so that the masks and the chunk combines are exercised anyway.
"""

import os

_DEVICE = os.environ.get("RNIP_TEST_DEVICE", "cpu")
if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rnip_ext.functional as RF  # noqa: E402
from rnip_ext._backend import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

if triton_available():
    from rnip_ext.kernels import _plan, bn_train
    from rnip_ext.kernels._config import BNConfig, bn_config, plan_chunks
    from rnip_ext.kernels._layout import acc_dtype, geometry, kernel_ready
    from rnip_ext.kernels.bn_backward import backward_chunked as bn_backward
    from rnip_ext.kernels.bn_normalize import normalize as bn_normalize
    from rnip_ext.kernels.bn_single import backward_single as bn_backward_single
    from rnip_ext.kernels.bn_single import forward_single as bn_forward_single
    from rnip_ext.kernels.bn_stats import launch_stats

    def bn_batch_stats(x, weight=None, shift=0.0, with_penalty=False, *, running=None, momentum=0.1,
                       num_batches_tracked=None, out=None, config=None):  # fmt: skip
        """The statistics reduction alone (partials + combine, the chunked forward's first two
        launches): ``(mean, var, penalty)``, into ``out`` when given."""
        x = kernel_ready(x)
        c, acc = x.shape[1], acc_dtype(x.dtype)
        penalize = with_penalty and weight is not None
        mean, var, pen = out if out is not None else (torch.empty(c, dtype=acc, device=x.device),
                                                      torch.empty(c, dtype=acc, device=x.device),
                                                      torch.empty(c if penalize else 0, dtype=acc, device=x.device))  # fmt: skip
        if c:
            launch_stats(_plan.plan(x, config).stats, x, weight, shift, mean, var, pen if penalize else None, running,
                         momentum, num_batches_tracked)  # fmt: skip
        return mean, var, pen

    def bn_forward_chunked(x, weight, bias, eps, shift=0.0, with_penalty=False, *, config=None, **running):
        """The chunked training forward (partials, combine, normalise) with ``config``'s tiles,
        or the default chunked ones."""
        if config is None:
            x = kernel_ready(x)
            config = bn_config(x.shape[1], _plan.channels_contiguous(geometry(x.shape, x.stride())))
        return bn_train.train_forward(x, weight, bias, eps, shift, with_penalty, config=config, **running)

    # Many tiles per chunk row, chunks and channel blocks even on tiny shapes.
    TINY = BNConfig(
        block_c=2, block_m=8, red_block_m=4, chunk_tiles=3, comb_block_c=2, comb_block_k=2
    )
    # The single-pass path: its default choice, and a forced one with 2-channel blocks and a
    # slice much wider than the positions (masks).
    SINGLE = "single"
    SINGLE_TINY = BNConfig(block_c=2, block_m=512, red_block_m=512, single_m=512, num_warps=1)
    CONFIGS = {"default": None, "tiny": TINY, "single": SINGLE, "single_tiny": SINGLE_TINY}
else:  # collected but skipped
    CONFIGS = {"default": None, "tiny": None, "single": None, "single_tiny": None}

DEVICE = torch.device(_DEVICE)
EPS = 1e-5
SHIFT = 0.4
TOL = {  # (rtol, atol) of fp32/fp64 kernels against the float64 reference
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-9, 1e-9),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Helpers.


def _seed(*parts) -> torch.Generator:
    """A generator for one case: the test's seed (tests/conftest.py) mixed with the case's parameters.

    Fresh inputs per test and per ``RNIP_TEST_SEED``, reproducible from both.
    """
    text = "/".join(str(p) for p in parts)
    case = sum((i + 1) * ord(ch) for i, ch in enumerate(text))
    return torch.Generator().manual_seed((torch.initial_seed() + case) % 2**63)


def _randn(shape, gen, scale=1.0, offset=0.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(
        dtype=dtype, device=DEVICE
    )


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in the layout under test (values unchanged)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a channel slice of a bigger NCHW tensor: strided, not dense
        n, c, h, w = t.shape
        big = torch.full((n, c + 3, h, w), float("nan"), dtype=t.dtype, device=t.device)
        big[:, 2 : c + 2] = t
        return big[:, 2 : c + 2]
    if layout == "slice4":  # strides congruent mod 4 with a dense copy, base off by H*W elements
        n, c, h, w = t.shape
        big = torch.full((n, c + 4, h, w), float("nan"), dtype=t.dtype, device=t.device)
        big[:, 1 : c + 1] = t
        return big[:, 1 : c + 1]
    raise ValueError(layout)


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer in ``t``'s layout pre-filled with NaN (the kernels must overwrite it)."""
    out = torch.empty_like(t)
    out.fill_(float("nan"))
    return out


def _nan_vec(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)


def _reference(x, weight, bias, dy, g, training, running=None, shift=SHIFT):
    """Float64 eager ``(y, mean, var, penalty, dx, dw, db)`` on the same (rounded) inputs."""
    xd = x.detach().double().requires_grad_()
    wd = None if weight is None else weight.detach().double().requires_grad_()
    bd = None if bias is None else bias.detach().double().requires_grad_()
    if training:
        dims = [0] + list(range(2, x.dim()))
        if x.numel() > x.shape[1]:
            y = RF.bounded_batch_norm(xd, None, None, wd, bd, True, 0.0, EPS)
        else:  # one value per channel, which F.batch_norm refuses: the formula by hand
            var = xd.var(dims, unbiased=False, keepdim=True)
            y = (xd - xd.mean(dims, keepdim=True)) / torch.sqrt(var + EPS)
            y = y * (1.0 if wd is None else torch.sigmoid(wd)[:, None, None])
            y = y + (0.0 if bd is None else bd[:, None, None])
        mean = xd.detach().mean(dims)
        var = xd.detach().var(dims, unbiased=False)
    else:
        rm, rv = (r.double() for r in running)
        y = RF.bounded_batch_norm(xd, rm, rv, wd, bd, False, 0.0, EPS)
        mean, var = rm, rv
    loss = (y * dy.double()).sum()
    penalty = None
    if wd is not None:
        penalty = RF.receding_penalty_per_channel(wd, shift)
        if g is not None:
            loss = loss + (penalty * g.double()).sum()
    inputs = [t for t in (xd, wd, bd) if t is not None]
    grads = iter(torch.autograd.grad(loss, inputs, allow_unused=True))
    dx = next(grads)
    dw = next(grads) if wd is not None else None
    db = next(grads) if bd is not None else None
    pen = None if penalty is None else penalty.detach()
    return y.detach(), mean, var, pen, dx, dw, db


def _eager_low_precision(x, weight, bias, dy, g, training, running=None):
    """The same computation by PyTorch in ``x``'s dtype (penalty in fp32): ``(y, dx, dw, db)``."""
    xl = x.detach().clone().requires_grad_()
    wl = None if weight is None else weight.detach().clone().requires_grad_()
    bl = None if bias is None else bias.detach().clone().requires_grad_()
    if training:
        y = RF.bounded_batch_norm(xl, None, None, wl, bl, True, 0.0, EPS)
    else:
        y = RF.bounded_batch_norm(xl, running[0], running[1], wl, bl, False, 0.0, EPS)
    loss = (y.float() * dy.float()).sum()
    if g is not None:
        loss = loss + (RF.receding_penalty_per_channel(wl, SHIFT) * g).sum()
    inputs = [t for t in (xl, wl, bl) if t is not None]
    grads = iter(torch.autograd.grad(loss, inputs, allow_unused=True))
    dx = next(grads)
    dw = next(grads) if wl is not None else None
    db = next(grads) if bl is not None else None
    return y.detach(), dx, dw, db


def _close(actual, expected, dtype, what):
    """fp32/fp64: ``assert_close`` at the dtype's tolerance."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def _within_eager_error(actual, expected, eager, dtype, what):
    """fp16/bf16 rule: our error <= 2 x PyTorch's error in that dtype + one ulp at the max value."""
    expected = expected.double().cpu()
    ours = (actual.double().cpu() - expected).abs().max().item() if expected.numel() else 0.0
    theirs = (eager.double().cpu() - expected).abs().max().item() if expected.numel() else 0.0
    ulp = torch.finfo(dtype).eps * (expected.abs().max().item() if expected.numel() else 0.0)
    assert ours <= 2 * theirs + ulp + 1e-6, (
        f"{what}: error {ours:.3g} vs eager {theirs:.3g} (+{ulp:.3g})"
    )


def _is_single(config) -> bool:
    return config == "single" or (isinstance(config, BNConfig) and config.single_m > 0)


def _run_case(
    shape, layout, dtype, affine, training, with_g, config, dy_layout=None, seed_extra=""
):
    """Forward + backward through the launchers on NaN-poisoned outputs, checked in full."""
    has_w, has_b = affine
    gen = _seed(shape, layout, dtype, affine, training, with_g, seed_extra)
    num_channels = shape[1]
    x = _layout(_randn(shape, gen, 3.0, 2.0, dtype), layout)
    weight = _randn((num_channels,), gen, 1.5) if has_w else None
    bias = _randn((num_channels,), gen) if has_b else None
    dy = _layout(_randn(shape, gen, 1.0, 0.0, dtype), dy_layout or layout)
    g = _randn((num_channels,), gen) if (with_g and has_w) else None
    running = None
    if not training:
        running = (_randn((num_channels,), gen, 1.0, 1.0), _randn((num_channels,), gen).abs() + 0.5)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    single = _is_single(config)
    if single:
        config = None if config == "single" else config
    if training and single:
        y, mean, var, pen = bn_forward_single(
            x, weight, bias, EPS, SHIFT, with_penalty=True,
            out=(_nan_like(x), _nan_vec(num_channels, acc), _nan_vec(num_channels, acc),
                 _nan_vec(num_channels if has_w else 0, acc)),
            config=config,
        )  # fmt: skip
    elif training:
        mean, var, pen = bn_batch_stats(
            x,
            weight,
            SHIFT,
            with_penalty=True,
            out=(_nan_vec(num_channels, acc), _nan_vec(num_channels, acc),
                 _nan_vec(num_channels if has_w else 0, acc)),
            config=config,
        )  # fmt: skip
    else:
        mean, var = running
        pen = None
    if not (training and single):  # eval forwards are elementwise on both paths
        y = bn_normalize(x, mean, var, weight, bias, EPS, out=_nan_like(x),
                         config=None if single else config)  # fmt: skip
    dx, dw, db = (bn_backward_single if single else bn_backward)(
        dy,
        x,
        mean,
        var,
        weight,
        g,
        EPS,
        SHIFT,
        training,
        (True, has_w, has_b),
        out=(
            _nan_like(x),
            _nan_vec(num_channels, acc) if has_w else None,
            _nan_vec(num_channels, acc) if has_b else None,
        ),
        config=config,
    )

    ref_y, ref_mean, ref_var, ref_pen, ref_dx, ref_dw, ref_db = _reference(
        x, weight, bias, dy, g, training, running
    )
    assert y.dtype == x.dtype and y.shape == x.shape and dx.dtype == x.dtype
    assert not torch.isnan(y).any() and not torch.isnan(dx).any()
    if training:
        # Statistics are fp32 (fp64) whatever the input dtype: fp32 tolerance for all dtypes.
        stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        _close(mean, ref_mean, stat_dtype, "mean")
        _close(var, ref_var, stat_dtype, "var")
        if has_w:
            _close(pen, ref_pen, stat_dtype, "penalty")
        else:
            assert pen.shape == (0,)
    if dtype in LOW_PRECISION:
        eager_y, eager_dx, eager_dw, eager_db = _eager_low_precision(
            x, weight, bias, dy, g, training, running
        )
        _within_eager_error(y, ref_y, eager_y, dtype, "y")
        _within_eager_error(dx, ref_dx, eager_dx, dtype, "dx")
        if has_w:
            _within_eager_error(dw, ref_dw, eager_dw, dtype, "dw")
        if has_b:
            _within_eager_error(db, ref_db, eager_db, dtype, "db")
    else:
        _close(y, ref_y, dtype, "y")
        _close(dx, ref_dx, dtype, "dx")
        if has_w:
            _close(dw, ref_dw, dtype, "dw")
        if has_b:
            _close(db, ref_db, dtype, "db")
    assert dw.shape == ((num_channels,) if has_w else (0,))
    assert db.shape == ((num_channels,) if has_b else (0,))
    return y, dx


# ---------------------------------------------------------------------------------------------
# The matrix: shapes x layouts x configs x affine x modes (fp32), then dtypes.

SHAPES = [
    (2, 3, 5, 7),  # odd everything
    (3, 1, 4, 4),  # C = 1
    (5, 6, 1, 1),  # H*W = 1
    (1, 5, 3, 3),  # N = 1
    (2, 130, 2, 3),  # more channels than one channels_last tile holds
]
AFFINE = [(True, True), (True, False), (False, False), (False, True)]


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matrix(shape, layout, training, config):
    for affine in AFFINE:
        _run_case(shape, layout, torch.float32, affine, training, True, CONFIGS[config])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_layout,dy_layout", [
    ("slice", "nchw"), ("nchw", "channels_last"), ("channels_last", "nchw"), ("channels_last", "slice"),
])  # fmt: skip
def test_mixed_and_strided_layouts(x_layout, dy_layout, training):
    for config in CONFIGS.values():
        _run_case((3, 4, 3, 5), x_layout, torch.float32, (True, True), training, True, config,
                  dy_layout=dy_layout)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dtypes(dtype, training, layout):
    for shape in [(2, 3, 5, 7), (4, 9, 2, 2)]:
        for config in CONFIGS.values():
            _run_case(shape, layout, dtype, (True, True), training, True, config)
            _run_case(shape, layout, dtype, (False, False), training, False, config)


def test_without_penalty_gradient():
    """``g = None``: dw is the BN term alone (checked by the reference built without g)."""
    for config in CONFIGS.values():
        _run_case((2, 5, 3, 3), "nchw", torch.float32, (True, True), True, False, config)


# ---------------------------------------------------------------------------------------------
# Numerics.


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_variance_is_stable_for_large_means(layout):
    """Chan merges: a mean of 1e4 with unit spread still gives fp32-accurate variances.

    ``E[x^2] - E[x]^2`` in fp32 would lose everything here (1e8 +- 1 in 24 bits).
    """
    gen = _seed("large-mean", layout)
    x = _layout(_randn((4, 3, 9, 8), gen, 1.0, 1e4), layout)
    ref = x.double()
    for config in CONFIGS.values():
        if _is_single(config):
            cfg = None if config == "single" else config
            _, mean, var, _ = bn_forward_single(x, None, None, EPS, config=cfg)
        else:
            mean, var, _ = bn_batch_stats(x, config=config)
        torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shift", [0.0, 2.5, -3.0])
def test_penalty_stable_for_extreme_weights(shift):
    """Penalty and its gradient are finite and accurate for |w| up to 1e4 (fp32 kernels)."""
    w = torch.tensor([-1e4, -80.0, -20.0, -1.18, 0.0, 1.0, 15.0, 40.0, 1e4], device=DEVICE)
    num_channels = w.numel()
    x = _randn((2, num_channels, 2, 2), _seed("extreme", shift))
    g = torch.ones(num_channels, device=DEVICE)
    _, _, pen = bn_batch_stats(x, w, shift, with_penalty=True)
    zero_dy = torch.zeros_like(x)
    mean = torch.zeros(num_channels, device=DEVICE)
    var = torch.ones(num_channels, device=DEVICE)
    _, dw, _ = bn_backward(zero_dy, x, mean, var, w, g, EPS, shift, True, (False, True, False))
    wd = w.double()
    ref_pen = RF.receding_penalty_per_channel(wd, shift)
    ref_grad = RF.receding_penalty_grad(wd, shift)
    assert torch.isfinite(pen).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(pen.double().cpu(), ref_pen.cpu(), rtol=1e-5, atol=1e-30)
    # dw here is g * dR/dw only (dy = 0); relative accuracy down to fp32's smallest normals.
    torch.testing.assert_close(dw.double().cpu(), ref_grad.cpu(), rtol=1e-4, atol=1e-37)
    # The BN scale's a * (1 - a) factor is just as stable: dw finite with dy != 0.
    _, dw2, _ = bn_backward(torch.ones_like(x), x, mean, var, w, None, EPS, shift, True, (False, True, False))
    assert torch.isfinite(dw2).all()


# ---------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(layout):
    """N = 0: empty y/dx, NaN-free statistics (mean = var = 0), dw = g * dR/dw, db = 0."""
    num_channels = 4
    x = _layout(torch.empty((0, num_channels, 3, 3), device=DEVICE), layout)
    w = _randn((num_channels,), _seed("empty"))
    b = _randn((num_channels,), _seed("empty-b"))
    g = _randn((num_channels,), _seed("empty-g"))
    mean, var, pen = bn_batch_stats(x, w, SHIFT, with_penalty=True)
    assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(var, torch.zeros_like(var))
    torch.testing.assert_close(pen, RF.receding_penalty_per_channel(w, SHIFT).detach())
    y = bn_normalize(x, mean, var, w, b, EPS)
    assert y.shape == x.shape and y.stride() == x.stride()
    for training in (True, False):
        dx, dw, db = bn_backward(torch.empty_like(x), x, mean, var, w, g, EPS, SHIFT, training)
        assert dx.shape == x.shape
        torch.testing.assert_close(dw, g * RF.receding_penalty_grad(w, SHIFT))
        assert torch.equal(db, torch.zeros_like(db))
    # No channels at all: nothing to launch, empty results.
    x0 = torch.empty((2, 0, 3, 3), device=DEVICE)
    mean0, var0, pen0 = bn_batch_stats(x0, torch.empty(0, device=DEVICE), 0.0, True)
    assert mean0.shape == var0.shape == pen0.shape == (0,)
    assert bn_normalize(x0, mean0, var0, None, None, EPS).shape == x0.shape


def test_single_value_per_channel():
    """n = 1 (N = H = W = 1): var = 0, y = bias, dx = 0; no NaN."""
    x = _randn((1, 3, 1, 1), _seed("single"))
    w = _randn((3,), _seed("single-w"))
    b = _randn((3,), _seed("single-b"))
    mean, var, _ = bn_batch_stats(x)
    assert torch.equal(var, torch.zeros_like(var))
    y = bn_normalize(x, mean, var, w, b, EPS)
    torch.testing.assert_close(y.flatten(), b)
    dx, _, _ = bn_backward(torch.ones_like(x), x, mean, var, w, None, EPS, 0.0, True)
    torch.testing.assert_close(dx, torch.zeros_like(dx))


def test_stores_stay_inside_their_view():
    """Outputs written into a view of a sentinel-filled buffer (with the input's strides, as the
    kernels require) leave the sentinels before and after it alone: the masks hold."""
    shape = (3, 5, 4, 3)
    pad = 37
    x = _randn(shape, _seed("view"), 2.0, 1.0)
    w = _randn((5,), _seed("view-w"))
    dy = _randn(shape, _seed("view-dy"))
    mean, var, _ = bn_batch_stats(x, config=TINY)

    def embedded():
        big = torch.full((x.numel() + 2 * pad,), 12345.0, device=DEVICE)
        return big, big[pad:pad + x.numel()].view(shape)

    for config in CONFIGS.values():
        (big_y, y_out), (big_dx, dx_out) = embedded(), embedded()
        if _is_single(config):
            cfg = None if config == "single" else config
            y = bn_forward_single(x, w, None, EPS, out=(y_out, torch.empty_like(mean), torch.empty_like(var),
                                                        torch.empty(0)), config=cfg)[0]  # fmt: skip
            dx, _, _ = bn_backward_single(dy, x, mean, var, w, None, EPS, 0.0, True, (True, False, False),
                                          out=(dx_out, None, None), config=cfg)  # fmt: skip
        else:
            y = bn_normalize(x, mean, var, w, None, EPS, out=y_out, config=config)
            dx, _, _ = bn_backward(dy, x, mean, var, w, None, EPS, 0.0, True, (True, False, False),
                                   out=(dx_out, None, None), config=config)  # fmt: skip
        for big in (big_y, big_dx):
            outside = torch.cat([big[:pad], big[-pad:]])
            assert torch.equal(outside, torch.full_like(outside, 12345.0))
        ref_y = RF.bounded_batch_norm(x.double(), None, None, w.double(), None, True, 0.0, EPS)
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(dx).all()
    with pytest.raises(ValueError, match="strides"):  # an output in another layout is refused
        bn_normalize(x, mean, var, w, None, EPS, out=torch.empty(3, 9, 4, 3, device=DEVICE)[:, 2:7])


def test_expanded_gradient_is_read_in_place():
    """A stride-0 ``dy`` (what ``y.sum()`` sends back) and a stride-0 ``g`` are read correctly."""
    shape = (2, 3, 4, 5)
    x = _randn(shape, _seed("expanded"), 2.0, 1.0)
    w = _randn((3,), _seed("expanded-w"))
    dy = torch.ones((), device=DEVICE).expand(shape)
    g = torch.full((), 0.7, device=DEVICE).expand(3)
    mean, var, _ = bn_batch_stats(x)
    for training, single in ((True, False), (False, False), (True, True), (False, True)):
        if single:
            dx, dw, db = bn_backward_single(dy, x, mean, var, w, g, EPS, SHIFT, training)
        else:
            dx, dw, db = bn_backward(dy, x, mean, var, w, g, EPS, SHIFT, training, config=TINY)
        ref = _reference(x, w, torch.zeros(3, device=DEVICE), dy.contiguous(), g.contiguous(),
                         training, (mean, var))  # fmt: skip
        _close(dx, ref[4], torch.float32, "dx")
        _close(dw, ref[5], torch.float32, "dw")
        _close(db, ref[6], torch.float32, "db")


def test_backward_is_deterministic():
    """Fixed-order partial reductions: bitwise-identical parameter gradients run to run."""
    shape = (4, 6, 5, 5)
    x = _randn(shape, _seed("det"), 2.0, 1.0).contiguous(memory_format=torch.channels_last)
    w = _randn((6,), _seed("det-w"))
    dy = _randn(shape, _seed("det-dy"))
    mean, var, _ = bn_batch_stats(x, config=TINY)
    first = bn_backward(dy, x, mean, var, w, None, EPS, 0.0, True, config=TINY)
    second = bn_backward(dy, x, mean, var, w, None, EPS, 0.0, True, config=TINY)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_output_mask_skips_work():
    """Unrequested gradients come back empty; eval with dx only runs the elementwise kernel."""
    x = _randn((2, 3, 4, 4), _seed("mask"))
    w = _randn((3,), _seed("mask-w"))
    mean, var, _ = bn_batch_stats(x)
    dx, dw, db = bn_backward(torch.ones_like(x), x, mean, var, w, None, EPS, 0.0, False, (True, False, False))
    assert dx.shape == x.shape and dw.shape == (0,) and db.shape == (0,)
    dx, dw, db = bn_backward(torch.ones_like(x), x, mean, var, w, None, EPS, 0.0, True, (False, True, True))
    assert dx.shape == (0,) and dw.shape == (3,) and db.shape == (3,)


# ---------------------------------------------------------------------------------------------
# The configuration choice.


def test_config_parallelises_few_channels_large_images(monkeypatch):
    """8x16x256x256 NCHW: hundreds of reduction programs on a GPU, not one per channel."""
    import rnip_ext.kernels._config as config_mod

    cfg = bn_config(16, channels_contiguous=False)
    n_pos = 8 * 256 * 256
    num_cblocks = -(-16 // cfg.block_c)
    monkeypatch.setattr(config_mod, "target_programs", lambda device: 4 * 132)  # H100/H200-sized
    chunk, num_chunks = plan_chunks(n_pos, num_cblocks, cfg, torch.device("cpu"))
    assert num_chunks * num_cblocks >= 4 * 132 * 0.9
    assert chunk % cfg.red_block_m == 0 and (num_chunks - 1) * chunk < n_pos <= num_chunks * chunk
    # channels_last tiles hold many channels, NCHW tiles long runs of positions.
    assert bn_config(64, channels_contiguous=True).block_c == 64
    assert bn_config(64, channels_contiguous=False).block_c <= 4
    with pytest.raises(ValueError, match="power of two"):
        BNConfig(block_c=3, block_m=8, red_block_m=8)


# ---------------------------------------------------------------------------------------------
# NCHW image tiles: images x BLOCK_HW positions of H*W, so rows vectorise (ResNet's 7x7/14x14).


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "slice"])
def test_image_tiles_match_reference(layout, training, dtype):
    """7x7 (odd: flat tiles), 14x14 (rows of 128 + a masked second row block), 2x2 (many images
    per tile, image mask), 4x6 (H*W factor 2) through the elementwise kernels (normalise, the
    chunked forward's normalise-with-combine, dx) against the float64 reference; the forced
    configs put one or several images in a tile and split a row over several row blocks."""
    mid = BNConfig(block_c=2, block_m=64, red_block_m=32, chunk_tiles=2, comb_block_c=2,
                   comb_block_k=2)  # fmt: skip
    shapes = [(2, 3, 7, 7), (2, 2, 14, 14), (5, 3, 2, 2), (3, 2, 4, 6)]
    for shape in shapes if dtype == torch.float32 else shapes[1:3]:
        # TINY (8-position tiles) on 14x14 would run hundreds of interpreted programs.
        configs = (None, mid) if shape[2] == 14 else (None, TINY, mid)
        for config in configs + (SINGLE,):
            _run_case(shape, layout, dtype, (True, True), training, True, config, seed_extra="img")
        if training:  # the chunked forward's second launch tiles like bn_normalize
            for config in configs:
                gen = _seed("img-chunked", shape, layout, dtype, str(config))
                x = _layout(_randn(shape, gen, 3.0, 2.0, dtype), layout)
                w, b = _randn((shape[1],), gen, 1.5), _randn((shape[1],), gen)
                y, mean, var, _ = bn_forward_chunked(x, w, b, EPS, SHIFT, True, config=config)
                ref_y, ref_mean, ref_var, *_ = _reference(x, w, b, torch.zeros_like(x), None, True)
                _close(mean, ref_mean, torch.float32, "mean")
                _close(var, ref_var, torch.float32, "var")
                if dtype in LOW_PRECISION:
                    eager_y = _eager_low_precision(x, w, b, torch.zeros_like(x), None, True)[0]
                    _within_eager_error(y, ref_y, eager_y, dtype, "y")
                else:
                    _close(y, ref_y, dtype, "y")


def test_image_tile_rule():
    """BLOCK_HW covers H*W up to 128; ALIGN divides H*W and the strides, up to 16 bytes."""
    from rnip_ext.kernels._config import image_tiles

    def nchw(c, hw):
        return [(c * hw, hw, 1)]

    assert image_tiles(49, 1024, 4, nchw(2048, 49)) == (0, 1)  # 7x7: odd rows stay flat
    assert image_tiles(196, 1024, 4, nchw(256, 196)) == (128, 4)  # 14x14 fp32: v4
    assert image_tiles(196, 1024, 2, nchw(256, 196)) == (128, 4)  # 14x14 fp16: H*W = 4 * 49
    assert image_tiles(4, 1024, 4, nchw(512, 4)) == (4, 4)  # 2x2
    assert image_tiles(3136, 1024, 2, nchw(64, 3136)) == (128, 8)  # 56x56 fp16: 16 bytes
    assert image_tiles(3136, 1024, 8, nchw(64, 3136)) == (128, 2)  # fp64: 16 bytes
    assert image_tiles(196, 8, 4, nchw(3, 196)) == (8, 4)  # never wider than the tile
    assert image_tiles(6, 1024, 4, [(5 * 6, 6, 1), (3 * 6, 6, 1)]) == (8, 2)  # slice + dense
    assert image_tiles(16, 1024, 4, [(48, 1, 3)]) == (0, 1)  # channels_last: unchanged
    assert image_tiles(1, 1024, 4, nchw(8, 1)) == (0, 1)  # one position per image
    assert image_tiles(16, 1024, 4, [(16 * 3 + 1, 16, 1)]) == (0, 1)  # odd batch stride


def test_single_pass_image_tile_rule():
    """A single-pass tile takes image rows (or split rows, for odd H*W) only when all N rows fit
    its SLICE_M positions."""
    def tiles(x, single_m):
        return _plan.slice_tiles(geometry(x.shape, x.stride()), x.element_size(), single_m)

    assert tiles(torch.empty(5, 3, 2, 2), 32) == (False, 4, 4, 0)  # 20 positions: 5 rows of 4
    assert tiles(torch.empty(5, 3, 2, 3), 32) == (False, 0, 1, 0)  # 5 rows of 8 would not fit: flat
    assert tiles(torch.empty(2, 3, 14, 14), 512) == (False, 256, 4, 0)  # 2 rows of 256
    assert tiles(torch.empty(4, 3, 4, 4).contiguous(memory_format=torch.channels_last), 64) == (True, 0, 1, 0)
    # ResNet-50's 7x7 at batch 64: 64 split rows, bodies of <= 48
    assert tiles(torch.empty(64, 8, 7, 7), 4096) == (False, 64, 4, 1)
    assert tiles(torch.empty(64, 8, 7, 7, dtype=torch.float16), 4096) == (False, 64, 8, 1)
    # 65 rows of 64 do not fit 4096 (the flat slice would, in 8192)
    assert tiles(torch.empty(65, 8, 7, 7), 4096) == (False, 0, 1, 0)


def test_split_tile_rule():
    """Odd H*W: an aligned vector body per plane plus scalar edges, when the plane holds at
    least 4 vectors and every tensor splits at the same positions."""
    from rnip_ext.kernels._config import image_tiles, split_tiles

    def nchw(c, hw):
        return [(c * hw, hw, 1)]

    assert split_tiles(49, 1024, 4, nchw(2048, 49)) == (64, 4)  # 7x7 fp32: v4 body <= 48
    assert split_tiles(49, 1024, 2, nchw(2048, 49)) == (64, 8)  # fp16/bf16: 8 per vector
    assert split_tiles(9, 1024, 8, nchw(64, 9)) == (8, 2)  # 3x3 fp64: v2 body <= 8
    assert split_tiles(9, 1024, 4, nchw(64, 9)) == (0, 1)  # 3x3 fp32: under 4 vectors
    assert split_tiles(25, 1024, 4, nchw(64, 25)) == (32, 4)  # 5x5 fp32: body <= 24
    assert split_tiles(3249, 1024, 4, nchw(64, 3249)) == (128, 4)  # 57x57: 128-wide row blocks
    assert split_tiles(49, 16, 4, nchw(8, 49)) == (16, 4)  # never wider than the tile
    assert split_tiles(49, 4096, 4, nchw(8, 49), cap=4096) == (64, 4)  # single-pass rows
    # Every tensor must split at the same positions: (s_n, s_c) congruent mod the vector width.
    assert split_tiles(49, 1024, 4, [(8 * 49, 49, 1), (8 * 49, 49, 1)]) == (64, 4)
    assert split_tiles(49, 1024, 4, [(11 * 49, 49, 1), (8 * 49, 49, 1)]) == (0, 1)  # a slice
    assert split_tiles(49, 1024, 4, [(11 * 49, 49, 1), (7 * 49, 49, 1)]) == (64, 4)  # 11 = 7 mod 4
    assert split_tiles(49, 1024, 4, [(49 * 8, 1, 8)]) == (0, 1)  # channels_last
    assert split_tiles(1, 1024, 4, nchw(8, 1)) == (0, 1)
    # Only where image tiles stay flat.
    assert image_tiles(196, 1024, 4, nchw(256, 196)) == (128, 4)
    assert split_tiles(196, 1024, 4, nchw(256, 196)) == (0, 1)
    assert split_tiles(6, 1024, 4, nchw(5, 6)) == (0, 1)  # image tiles with ALIGN 2


def test_split_tile_programs():
    """Split tiles' position programs: row blocks cover the widest body, edges ride on the first."""
    x = torch.empty(64, 8, 7, 7)
    g = geometry(x.shape, x.stride())
    cfg = bn_config(8, channels_contiguous=False)  # block_m 1024: 16 images x 64
    assert _plan.position_tiles(g, 4, cfg, False) == (False, 64, 4, 1, 4)
    small = BNConfig(block_c=2, block_m=16, red_block_m=16)  # 1 image x 3 row blocks of 16
    assert _plan.position_tiles(g, 4, small, False) == (False, 16, 4, 1, 64 * 3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)  # fmt: skip
def test_split_tiles_match_reference(dtype, training):
    """Odd H*W (7x7, 5x5, 5x7, 3x3, 9x7) through every split-tile kernel (normalise, dx, the
    chunked forward's normalise-with-combine, both single-pass kernels) against the float64
    reference: planes start on every residue modulo the vector width (odd H*W, 3 channels), one
    or several images per tile, a row split over several row blocks (16-position bodies), and
    the single-pass tile's extra image rows masked."""
    rows16 = BNConfig(block_c=2, block_m=16, red_block_m=16, chunk_tiles=2, comb_block_c=2,
                      comb_block_k=2)  # fmt: skip
    mid = BNConfig(block_c=2, block_m=64, red_block_m=32, chunk_tiles=2, comb_block_c=2,
                   comb_block_k=2)  # fmt: skip
    shapes = {
        torch.float32: [(3, 3, 7, 7), (2, 3, 5, 5)],
        torch.float16: [(2, 3, 7, 7)],
        torch.bfloat16: [(3, 2, 5, 7)],
        torch.float64: [(3, 3, 3, 3), (2, 2, 9, 7)],
    }[dtype]
    for shape in shapes:
        for config in (None, mid, rows16, SINGLE):
            _run_case(shape, "nchw", dtype, (True, True), training, True, config,
                      seed_extra="split")  # fmt: skip
        if dtype == torch.float32:  # a channel slice splits like its dense outputs
            for config in (None, rows16):
                _run_case(shape, "slice4", dtype, (True, False), training, True, config,
                          seed_extra="split")  # fmt: skip
        if training:
            gen = _seed("split-chunked", shape, dtype)
            x = _randn(shape, gen, 3.0, 2.0, dtype)
            w, b = _randn((shape[1],), gen, 1.5), _randn((shape[1],), gen)
            y, mean, var, _ = bn_forward_chunked(x, w, b, EPS, SHIFT, True, config=rows16)
            ref_y, ref_mean, ref_var, *_ = _reference(x, w, b, torch.zeros_like(x), None, True)
            _close(mean, ref_mean, torch.float64 if dtype == torch.float64 else torch.float32,
                   "mean")  # fmt: skip
            if dtype in LOW_PRECISION:
                eager_y = _eager_low_precision(x, w, b, torch.zeros_like(x), None, True)[0]
                _within_eager_error(y, ref_y, eager_y, dtype, "y")
            else:
                _close(y, ref_y, dtype, "y")


def test_reduction_image_tile_rule():
    """NCHW reduction partials take image tiles where the elementwise kernels do (not for odd
    H*W), in chunks of an image group's row blocks."""
    from rnip_ext.kernels._config import plan_image_chunks

    cpu = torch.device("cpu")
    cfg = bn_config(256, channels_contiguous=False)  # 4 channels x 512 positions

    def tiles(x, config, split=False):
        g = geometry(x.shape, x.stride())
        cl = _plan.channels_contiguous(g)
        return _plan.reduction_tiles(g, x.element_size(), config, cl, -(-g.c // config.block_c), cpu, split)

    flat, block_hw, align, split, images, seg, num_chunks, _ = tiles(torch.empty(64, 256, 14, 14), cfg)
    assert (flat, block_hw, align, split) == (False, 128, 4, 0)  # 4 images x 128 per tile, 2 row blocks
    assert images % 4 == 0 and seg == 2 and num_chunks == -(-64 // images)
    # Chunk sizes: chunk_tiles tiles rounded up to whole image groups, or one group's segment.
    many = BNConfig(block_c=2, block_m=32, red_block_m=32, chunk_tiles=20)
    assert plan_image_chunks(5, 196, 32, 1, many, cpu) == (3, 7, 2)  # 7 row blocks: 3 images
    two = BNConfig(block_c=2, block_m=64, red_block_m=64, chunk_tiles=2)
    assert plan_image_chunks(6, 24, 32, 1, two, cpu) == (4, 1, 2)  # 2 images per tile
    assert plan_image_chunks(6, 96, 32, 1, two, cpu) == (2, 2, 6)  # 3 row blocks: segments of 2
    assert plan_image_chunks(0, 24, 32, 1, two, cpu)[2] == 0
    # Odd H*W: split tiles for the backward sums only (split=True); the statistics stay flat.
    x7 = torch.empty(8, 4, 7, 7)
    assert tiles(x7, cfg)[:4] == (False, 0, 1, 0)
    assert tiles(x7, cfg, split=True)[:4] == (False, 64, 4, 1)
    # Flat where neither is taken: channels_last.
    xl = torch.empty(8, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    assert tiles(xl, bn_config(4, channels_contiguous=True), split=True)[:4] == (True, 0, 1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_reduction_image_tiles_match_reference(dtype):
    """Statistics and backward sums over image tiles against the float64 reference: chunks of
    several image groups with short lanes in the last row block (14x14 in 32-position rows:
    the per-lane Welford counts), a group with a missing image (6 images, 2 per tile, 4 per
    chunk), row blocks shorter than the vector width, and a mean of 1e4 (Chan merges)."""
    many = BNConfig(block_c=2, block_m=32, red_block_m=32, chunk_tiles=20, comb_block_c=2,
                    comb_block_k=2)  # fmt: skip
    two = BNConfig(block_c=2, block_m=64, red_block_m=64, chunk_tiles=2, comb_block_c=2,
                   comb_block_k=2)  # fmt: skip
    cases = [((5, 2, 14, 14), many), ((6, 3, 4, 6), two), ((6, 3, 4, 6), TINY)]
    if dtype != torch.float32:
        cases = cases[1:2]
    for shape, config in cases:
        for training in (True, False):
            _run_case(shape, "nchw", dtype, (True, True), training, True, config,
                      seed_extra="red")  # fmt: skip
    if dtype == torch.float32:
        gen = _seed("red-large-mean")
        x = _randn((5, 3, 14, 14), gen, 1.0, 1e4)
        ref = x.double()
        for config in (many, two, None):
            mean, var, _ = bn_batch_stats(x, config=config)
            torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-6, atol=0)
            torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False),
                                       rtol=1e-4, atol=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Running statistics updated inside the kernels (the statistics combine, the single-pass kernel).


def _training_forward(x, config, fused=False, **running_kw):
    """A training forward through the launchers of ``config``'s path, with the running update."""
    if _is_single(config):
        cfg = None if config == "single" else config
        return bn_forward_single(x, None, None, EPS, config=cfg, **running_kw)[1:3]
    if fused:
        return bn_forward_chunked(x, None, None, EPS, config=config, **running_kw)[1:3]
    mean, var, _ = bn_batch_stats(x, config=config, **running_kw)
    return mean, var


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_running_statistics_update_in_kernel(momentum, layout, dtype):
    """``running += f (batch - running)``, unbiased variance, ``f = 1/num_batches_tracked`` for None.

    The nn.BatchNorm2d rule, checked against float64 arithmetic on the same inputs for every path.
    """
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    cases = [(name, config, False) for name, config in CONFIGS.items()]
    cases += [(name + "+fused", config, True) for name, config in CONFIGS.items() if not _is_single(config)]
    for name, config, fused in cases:
        gen = _seed("running", momentum, layout, dtype, name)
        x = _layout(_randn((3, 5, 3, 4), gen, 2.0, 1.0, dtype), layout)
        rm0 = _randn((5,), gen, 1.0, 0.5, stat)
        rv0 = _randn((5,), gen).abs().to(stat) + 0.5
        rm, rv = rm0.clone(), rv0.clone()
        nbt = torch.tensor(2, dtype=torch.long, device=DEVICE)  # this call makes it 3
        mean, var = _training_forward(x, config, fused, running=(rm, rv), momentum=momentum,
                                      num_batches_tracked=nbt)  # fmt: skip
        xd = x.double()
        f = 1.0 / 3.0 if momentum is None else momentum
        n = xd.numel() // 5
        ref_rm = (1 - f) * rm0.double() + f * xd.mean((0, 2, 3))
        ref_rv = (1 - f) * rv0.double() + f * xd.var((0, 2, 3), unbiased=True)
        # fp64: momentum travels as a float32 kernel argument (relative rounding 3e-8).
        tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm.double(), ref_rm, **tol, msg=lambda m: f"{name} mean: {m}")
        torch.testing.assert_close(rv.double(), ref_rv, **tol, msg=lambda m: f"{name} var: {m}")
        torch.testing.assert_close(var.double() * n / (n - 1), xd.var((0, 2, 3)), **tol)
        assert nbt.item() == 3, name  # incremented exactly once (by a kernel or before it)


def test_running_statistics_left_alone_without_positions_or_buffers():
    """An empty batch moves no statistics; no ``running`` means no update at all."""
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    x = torch.empty((0, 4, 3, 3), device=DEVICE)
    for momentum in (0.5, None):
        nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
        bn_batch_stats(x, running=(rm, rv), momentum=momentum, num_batches_tracked=nbt)
        assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
        assert nbt.item() == 1  # counted, as nn.BatchNorm2d counts an empty batch
    x = _randn((2, 4, 3, 3), _seed("no-running"), 2.0, 3.0)
    for config in CONFIGS.values():
        _training_forward(x, config)
        assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "slice"])
def test_chunked_forward_in_two_launches_matches_reference(layout, dtype):
    """Partials + normalise-with-combine: y, statistics and penalty as the float64 reference."""
    shapes = [(2, 3, 5, 7), (3, 1, 4, 4), (5, 6, 1, 1), (2, 130, 2, 3)]
    for shape in shapes if dtype == torch.float32 else shapes[:1]:
        for config in (None, TINY):
            for has_w, has_b in ((True, True), (False, False)):
                gen = _seed("fused-chunked", shape, layout, dtype, config is None, has_w)
                c = shape[1]
                x = _layout(_randn(shape, gen, 3.0, 2.0, dtype), layout)
                w = _randn((c,), gen, 1.5) if has_w else None
                b = _randn((c,), gen) if has_b else None
                y, mean, var, pen = bn_forward_chunked(x, w, b, EPS, SHIFT, True, config=config)
                ref_y, ref_mean, ref_var, ref_pen, *_ = _reference(
                    x, w, b, torch.zeros_like(x), None, True
                )
                stat = torch.float64 if dtype == torch.float64 else torch.float32
                _close(mean, ref_mean, stat, "mean")
                _close(var, ref_var, stat, "var")
                if has_w:
                    _close(pen, ref_pen, stat, "penalty")
                assert y.stride() == x.contiguous(memory_format=_format_of(x)).stride() or layout == "slice"
                if dtype in LOW_PRECISION:
                    eager_y = _eager_low_precision(x, w, b, torch.zeros_like(x), None, True)[0]
                    _within_eager_error(y, ref_y, eager_y, dtype, "y")
                else:
                    _close(y, ref_y, dtype, "y")


def _format_of(t):
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else torch.contiguous_format


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_distributed_backward_pieces_match_the_fused_backward(layout):
    """``backward_sums`` (local sums, dw, db) + ``backward_dx`` (given means), the pieces
    SyncBoundedBatchNorm2d puts around its all-reduce, equal ``backward_chunked`` on one process."""
    from rnip_ext.kernels.bn_backward import backward_dx, backward_sums

    for config in (None, TINY):
        gen = _seed("dist-pieces", layout, config is None)
        x = _layout(_randn((3, 5, 4, 3), gen, 2.0, 1.0), layout)
        dy = _layout(_randn((3, 5, 4, 3), gen), layout)
        w, g = _randn((5,), gen), _randn((5,), gen).expand(5)
        mean, var, _ = bn_batch_stats(x)
        sums, dw, db = backward_sums(dy, x, mean, var, w, g, EPS, SHIFT, config=config)
        ref_dx, ref_dw, ref_db = bn_backward(dy, x, mean, var, w, g, EPS, SHIFT, True)
        _close(dw, ref_dw, torch.float32, "dw")
        _close(db, ref_db, torch.float32, "db")
        _close(sums[0], ref_db, torch.float32, "sum(dy)")
        dx = backward_dx(dy, x, mean, var, w, sums / 36.0, EPS, config=config)
        _close(dx, ref_dx, torch.float32, "dx")


# ---------------------------------------------------------------------------------------------
# The entry points the ops call, on their default configurations: every path and tile kind once
# per dtype and layout. This is the kernel part of the GPU run's test step
# (benchmarks/gpu_tests.py): on a GPU it compiles each variant the launchers pick for such shapes.

COMPILED_CASES = {  # name: (shape, momentum); the default configuration picks the path
    "single-image": ((16, 6, 4, 4), 0.1),  # NCHW image tiles (one 16-position row per image)
    "single-split": ((8, 3, 7, 7), 0.1),  # odd H*W: vector bodies + scalar edges
    "single-c1": ((5, 1, 3, 5), None),  # C = 1, flat tiles, cumulative running average
    "chunked-image": ((4, 3, 48, 48), 0.1),  # 9216 positions: chunked, NCHW image tiles
    "chunked-split": ((3, 2, 57, 57), 0.1),  # odd H*W chunked: split backward partials
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_paths(case, layout, dtype):
    """``train_forward`` (statistics, penalty, running statistics in-kernel), ``train_backward``
    (penalty gradient fused) and the eval forward/backward against the float64 reference."""
    from rnip_ext.kernels import bn_train

    shape, momentum = COMPILED_CASES[case]
    c = shape[1]
    gen = _seed("compiled", case, layout, dtype)
    x = _layout(_randn(shape, gen, 3.0, 2.0, dtype), layout)
    dy = _layout(_randn(shape, gen, 1.0, 0.0, dtype), layout)
    w, b, g = _randn((c,), gen, 1.5), _randn((c,), gen), _randn((c,), gen)
    has_b = case.endswith(("image", "c1"))  # the layer's default is no shift
    b = b if has_b else None
    assert bn_train.uses_single_pass(x) == case.startswith("single"), case
    rm0, rv0 = _randn((c,), gen), _randn((c,), gen).abs() + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    nbt = torch.tensor(4, device=DEVICE)
    y, mean, var, pen = bn_train.train_forward(x, w, b, EPS, SHIFT, True, running=(rm, rv),
                                               momentum=momentum, num_batches_tracked=nbt)  # fmt: skip
    dx, dw, db = bn_train.train_backward(dy, x, mean, var, w, g, EPS, SHIFT, True, (True, True, has_b))
    ref_y, ref_mean, ref_var, ref_pen, ref_dx, ref_dw, ref_db = _reference(x, w, b, dy, g, True)
    _close(mean, ref_mean, torch.float32, "mean")
    _close(var, ref_var, torch.float32, "var")
    _close(pen, ref_pen, torch.float32, "penalty")
    f = 1.0 / 5.0 if momentum is None else momentum
    n = x.numel() // c
    _close(rm, (1 - f) * rm0.double() + f * ref_mean, torch.float32, "running_mean")
    _close(rv, (1 - f) * rv0.double() + f * ref_var * n / (n - 1), torch.float32, "running_var")
    assert nbt.item() == 5
    outputs = [("y", y, ref_y), ("dx", dx, ref_dx), ("dw", dw, ref_dw)] + ([("db", db, ref_db)] if has_b else [])
    # Eval: normalise with the running statistics, backward with them as constants.
    y_eval = bn_normalize(x, rm, rv, w, b, EPS)
    dx_eval, dw_eval, _ = bn_train.train_backward(dy, x, rm, rv, w, None, EPS, SHIFT, False, (True, True, False))
    ref_eval = _reference(x, w, b, dy, None, False, (rm, rv))
    outputs += [("y eval", y_eval, ref_eval[0]), ("dx eval", dx_eval, ref_eval[4]), ("dw eval", dw_eval, ref_eval[5])]
    if dtype in LOW_PRECISION:
        eager = _eager_low_precision(x, w, b, dy, g, True)
        eager_eval = _eager_low_precision(x, w, b, dy, None, False, (rm, rv))
        baseline = dict(zip(["y", "dx", "dw", "db"], eager), **dict(zip(["y eval", "dx eval", "dw eval"],
                                                                        eager_eval[:3])))  # fmt: skip
        for what, actual, expected in outputs:
            _within_eager_error(actual, expected, baseline[what], dtype, what)
    else:
        for what, actual, expected in outputs:
            if what.startswith(("dw", "db")):  # sums over up to ~10K positions
                torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=1e-4,
                                           msg=lambda m, what=what: f"{what}: {m}")  # fmt: skip
            else:
                _close(actual, expected, dtype, what)
    for t in (y, dx, y_eval, dx_eval):
        assert t.stride() == x.stride()


# ---------------------------------------------------------------------------------------------
# Path choice: single-pass vs chunked (pure Python, no GPU).


def test_single_pass_rule_covers_small_slices_in_every_dtype_and_layout():
    """Every layer with N*H*W <= 2048 takes the single-pass path, in every dtype, in NCHW; in
    channels_last exactly when a program's channel block reads >= 32 contiguous bytes per
    position (or all channels): narrower blocks load scalars (issue 21, hazard 3)."""
    from rnip_ext.kernels._config import SINGLE_MAX_ELEMS, single_pass_config

    taken = {False: 0, True: 0}
    for n_pos in (1, 2, 7, 16, 100, 1023, 1024, 1025, 2047, 2048):
        for c in (1, 3, 64, 512, 2048):
            for hw in {1, 4, 49, n_pos}:
                for cl in (False, True):
                    for elem in (2, 4, 8):
                        cfg = single_pass_config(n_pos, c, hw, cl, elem)
                        if cl and cfg is None:
                            single_m = max(16, 1 << (n_pos - 1).bit_length())
                            widest = min(SINGLE_MAX_ELEMS // single_m, 64)
                            assert widest * elem < 32 and widest < c, (n_pos, c, hw, elem)
                            continue
                        assert cfg is not None, (n_pos, c, hw, cl, elem)
                        taken[cl] += 1
                        assert cfg.single_m >= n_pos and cfg.single_m < 2 * max(n_pos, 16)
                        assert cfg.block_c * cfg.single_m <= SINGLE_MAX_ELEMS
                        assert cfg.block_c <= max(c, 1) * 2 - 1 or cfg.block_c == 1
                        assert not cl or cfg.block_c * elem >= 32 or cfg.block_c >= c
                        assert 1 <= cfg.num_warps <= 16
    assert taken[True] > taken[False] / 2  # small slices still take it in channels_last


def test_single_pass_rule_on_real_layers():
    """CIFAR VGG-16 (batch 128) deep layers and ResNet-50 7x7 (batch 64) fit; big slices do not."""
    from rnip_ext.kernels._config import single_pass_config

    def cfg(n, c, h, w, cl=False, elem=4):
        return single_pass_config(n * h * w, c, h * w, cl, elem)

    assert cfg(128, 512, 2, 2) is not None and cfg(128, 512, 4, 4) is not None
    assert cfg(128, 256, 8, 8) is not None  # 8192 positions: 256 programs of one channel
    assert cfg(64, 2048, 7, 7) is not None and cfg(64, 2048, 7, 7, elem=2) is not None
    # channels_last with 1-4 channels per program (scalar loads): the chunked path instead.
    assert cfg(64, 2048, 7, 7, cl=True, elem=2) is None and cfg(128, 256, 8, 8, cl=True) is None
    assert cfg(128, 128, 16, 16) is None and cfg(64, 256, 56, 56) is None  # chunked
    assert cfg(0, 16, 4, 4) is None  # nothing to hold: the chunked path handles empty batches
    assert cfg(4, 3, 32, 32) is None  # 4096 positions over 3 channels: too few programs
    # channels_last: a program's run of channels fills a 32-byte sector when the budget allows.
    assert cfg(128, 512, 2, 2, cl=True, elem=2).block_c == 16
    assert cfg(128, 512, 2, 2, cl=True, elem=4).block_c == 8
    # NCHW with tiny images: several channels per program make contiguous runs longer.
    assert cfg(128, 512, 2, 2, cl=False, elem=4).block_c == 2


def test_train_entry_points_pick_the_path():
    """``train_forward``/``train_backward`` run the single-pass kernels exactly when the rule says."""
    from rnip_ext.kernels import bn_train

    calls = []
    small = _randn((2, 3, 4, 4), _seed("path-small"))
    assert bn_train.uses_single_pass(small)
    assert not bn_train.uses_single_pass(small, TINY)
    assert bn_train.uses_single_pass(small, SINGLE_TINY)
    big = torch.zeros((1, 1, 128, 128), device=DEVICE)  # 16384 positions: chunked
    assert not bn_train.uses_single_pass(big)
    for config in (None, TINY):
        y, mean, var, _ = bn_train.train_forward(small, None, None, EPS, config=config)
        ref = RF.bounded_batch_norm(small.double(), None, None, None, None, True, 0.0, EPS)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        dx, _, _ = bn_train.train_backward(torch.ones_like(small), small, mean, var, None, None,
                                           EPS, 0.0, True, (True, False, False), config=config)  # fmt: skip
        calls.append(dx.abs().max().item())
    assert max(calls) < 1e-4  # dy = 1 everywhere: the mean subtraction cancels it exactly-ish


# ---------------------------------------------------------------------------------------------
# Property test: random shapes, layouts and strides.

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    given = None


if given is not None:

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        n=st.integers(0, 4),
        c=st.integers(1, 9),
        h=st.integers(1, 5),
        w=st.integers(1, 6),
        layout=st.sampled_from(["nchw", "channels_last", "slice"]),
        dy_layout=st.sampled_from(["nchw", "channels_last", "slice"]),
        training=st.booleans(),
        tiny=st.booleans(),
        affine=st.sampled_from(AFFINE),
        path=st.sampled_from(["chunked", "single"]),
    )
    def test_property_random_shapes(n, c, h, w, layout, dy_layout, training, tiny, affine, path):
        config = (TINY if tiny else None) if path == "chunked" else (SINGLE_TINY if tiny else SINGLE)
        if n == 0:
            if path != "chunked":  # an empty batch always takes the chunked path
                return
            _check_empty_property(c, h, w, layout, training, affine, config)
        else:
            _run_case((n, c, h, w), layout, torch.float32, affine, training, True, config,
                      dy_layout=dy_layout, seed_extra=(h, w))  # fmt: skip

    def _check_empty_property(c, h, w, layout, training, affine, config):
        x = _layout(torch.empty((0, c, h, w), device=DEVICE), layout)
        weight = torch.zeros(c, device=DEVICE) if affine[0] else None
        bias = torch.zeros(c, device=DEVICE) if affine[1] else None
        mean, var, _ = bn_batch_stats(x, weight, config=config)
        y = bn_normalize(x, mean, var, weight, bias, EPS, config=config)
        assert y.shape == x.shape
        assert torch.equal(var, torch.zeros_like(var))
        dx, dw, db = bn_backward(torch.empty_like(x), x, mean, var, weight, None, EPS, 0.0, training,
                                 (True, affine[0], affine[1]), config=config)  # fmt: skip
        assert dx.shape == x.shape
        assert not torch.isnan(dw).any() and not torch.isnan(db).any()


def test_interpreter_is_active_for_cpu_runs():
    """Guard for this file's own setup: CPU kernels must be the interpreted ones."""
    if DEVICE.type != "cpu":
        pytest.skip(reason="kernels run compiled on the GPU (RNIP_TEST_DEVICE=cuda)")
    from triton.runtime.interpreter import InterpretedFunction

    from rnip_ext.kernels import bn_stats

    assert isinstance(bn_stats._bn_partial_stats_kernel, InterpretedFunction)



# ---------------------------------------------------------------------------------------------
# The kernels also compile for a GPU (no GPU needed): code the interpreter accepts but the
# compiler would reject (e.g. methods on int arguments Triton specialises to constexpr 1) fails
# here rather than on the first GPU run.

_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rnip_ext.kernels import bn_backward, bn_normalize, bn_single, bn_stats

X_LIKE = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}
FLOATS = {"eps", "shift", "momentum"}
ONES = {"C", "s_hw"}  # what Triton may specialise

def build(kernel, consts, x_dtype, acc, specialise_ones, num_warps):
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:  # constexprs, and absent (None) pointers
            sig[name], cx[name] = "constexpr", consts[name]
        elif specialise_ones and name in ONES:
            sig[name], cx[name] = "constexpr", 1
        elif name == "nbt_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (x_dtype if name in X_LIKE else acc)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    src = ASTSource(kernel, sig, cx, attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

NONE = None
count = 0
for x_dtype, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")):
    ACC = tl.float64 if acc == "fp64" else tl.float32
    for flat, ones in ((0, False), (1, True)):
        tiles = dict(FLAT=flat, ACC=ACC, BLOCK_HW=0, ALIGN=1)
        red = dict(tiles, BLOCK_C=4, BLOCK_M=512)
        ew = dict(tiles, BLOCK_C=64, BLOCK_M=64, SPLIT=0)
        single = dict(tiles, BLOCK_C=2, SLICE_M=2048, SPLIT=0)
        no_affine = dict(w_ptr=NONE, b_ptr=NONE)
        jobs = [
            (bn_stats._bn_partial_stats_kernel, red, 8),
            (bn_stats._bn_combine_stats_kernel, dict(BLOCK_C=64, BLOCK_K=32, ACC=ACC, RUNNING=2 * flat), 4),
            (bn_stats._bn_combine_stats_kernel,
             dict(BLOCK_C=64, BLOCK_K=32, ACC=ACC, RUNNING=0, pen_ptr=NONE, rmean_ptr=NONE, rvar_ptr=NONE,
                  nbt_ptr=NONE), 4),
            (bn_normalize._bn_normalize_kernel, ew, 8),
            (bn_normalize._bn_normalize_kernel, dict(ew, **no_affine), 8),
            (bn_backward._bn_bwd_partial_kernel, dict(red, SPLIT=0), 8),
            (bn_backward._bn_bwd_combine_kernel, dict(BLOCK_C=64, BLOCK_K=32, ACC=ACC), 4),
            (bn_backward._bn_bwd_combine_kernel, dict(BLOCK_C=64, BLOCK_K=32, ACC=ACC, g_ptr=NONE, dw_ptr=NONE), 4),
            (bn_backward._bn_bwd_dx_kernel, dict(ew, MEANS=flat), 8),
            (bn_backward._bn_bwd_dx_kernel, dict(ew, MEANS=0, x_ptr=NONE, mean_ptr=NONE, w_ptr=NONE,
                                                 sum_dy_ptr=NONE, sum_dyxhat_ptr=NONE), 8),
            (bn_single._bn_fwd_single_kernel, dict(single, RUNNING=flat + 1), 8),
            (bn_single._bn_fwd_single_kernel,
             dict(single, RUNNING=0, pen_ptr=NONE, rmean_ptr=NONE, rvar_ptr=NONE, nbt_ptr=NONE, **no_affine), 8),
            (bn_single._bn_bwd_single_kernel, dict(single, TRAINING=1), 8),
            (bn_single._bn_bwd_single_kernel,
             dict(single, TRAINING=0, w_ptr=NONE, g_ptr=NONE, dw_ptr=NONE, db_ptr=NONE), 8),
        ]
        if not flat:  # split tiles (odd H*W): 64-wide bodies, vector-width edges
            vec = 16 // {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[x_dtype]
            split = dict(BLOCK_HW=64, ALIGN=vec, SPLIT=1)
            image = dict(red, BLOCK_HW=128, ALIGN=vec)  # reductions over image tiles
            jobs += [
                (bn_stats._bn_partial_stats_kernel, image, 8),
                (bn_backward._bn_bwd_partial_kernel, dict(image, SPLIT=0), 8),
                (bn_backward._bn_bwd_partial_kernel, dict(red, **split), 8),
                (bn_normalize._bn_normalize_kernel, dict(ew, **split), 8),
                (bn_backward._bn_bwd_dx_kernel, dict(ew, MEANS=0, **split), 8),
                (bn_single._bn_fwd_single_kernel, dict(single, RUNNING=1, **split), 8),
                (bn_single._bn_bwd_single_kernel, dict(single, TRAINING=1, **split), 8),
            ]
        for kernel, consts, warps in jobs:
            build(kernel, consts, x_dtype, acc, ones, warps)
            count += 1
print("compiled", count)
"""


def test_kernels_compile_for_gpu():
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip(reason="this Triton has no NVIDIA backend to compile with")
    from rnip_ext.kernels._variants import internals_supported

    if not internals_supported():  # ASTSource took an AttrsDescriptor, not a dict, before 3.6
        pytest.skip(reason="compiling without a GPU uses Triton internals checked from triton 3.6 on")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 140" in done.stdout
