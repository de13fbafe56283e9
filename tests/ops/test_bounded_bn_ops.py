"""The ``rnip_ext::bounded_bn_*`` custom ops: opcheck, gradcheck, torch.compile, errors, backend.

Runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` is set below, before any
kernel module is imported); ``RNIP_TEST_DEVICE=cuda`` runs the same tests on the GPU.
"""

import os

_DEVICE = os.environ.get("RNIP_TEST_DEVICE", "cpu")
if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import rnip_ext.functional as RF  # noqa: E402
from rnip_ext import _backend  # noqa: E402
from rnip_ext._backend import resolve_backend, triton_available  # noqa: E402
from rnip_ext.ops import bounded_bn as B  # noqa: E402

DEVICE = torch.device(_DEVICE)
EPS = 1e-5
SHIFT = 0.3
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
ops = torch.ops.rnip_ext


def _gen(seed: int) -> torch.Generator:
    """A generator for one input: the test's seed (tests/conftest.py) plus ``seed``."""
    return torch.Generator().manual_seed((torch.initial_seed() + seed) % 2**63)


def _inputs(shape=(2, 3, 4, 5), dtype=torch.float32, seed=0, channels_last=False, requires_grad=True):
    """``(x, weight, bias)`` with fresh values; weight/bias require grad."""
    gen = _gen(seed)
    num_channels = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype=dtype, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(num_channels, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    b = torch.randn(num_channels, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    return tuple(t.requires_grad_(requires_grad) for t in (x, w, b))


def _running(num_channels, dtype=torch.float32, seed=1):
    gen = _gen(seed)
    rm = torch.randn(num_channels, generator=gen, dtype=torch.float64).to(dtype=dtype, device=DEVICE)
    rv = (torch.rand(num_channels, generator=gen, dtype=torch.float64) + 0.5).to(dtype=dtype, device=DEVICE)
    return rm, rv


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake kernel, autograd registration, AOT dispatch (static and dynamic shapes).


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=str)
@pytest.mark.parametrize("with_penalty", [True, False], ids=["penalty", "no_penalty"])
def test_opcheck_train(channels_last, affine, with_penalty):
    x, w, b = _inputs(channels_last=channels_last)
    args = (x, w if affine[0] else None, b if affine[1] else None, EPS, SHIFT, with_penalty)
    torch.library.opcheck(ops.bounded_bn_train.default, args)


@needs_triton
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 2, 64, 40)], ids=["single_pass", "chunked"])
def test_opcheck_train_update(momentum, shape):
    """The mutating variant: schema (mutated buffers declared), fake kernel, AOT dispatch."""
    x, w, b = _inputs(shape=shape, requires_grad=False, channels_last=True)
    rm, rv = _running(x.shape[1])
    nbt = torch.tensor(4, dtype=torch.long, device=DEVICE)
    args = (x, w, None, EPS, SHIFT, True, rm, rv, nbt, momentum)
    torch.library.opcheck(ops.bounded_bn_train_update.default, args)


@needs_triton
@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum", "cumulative"])
def test_train_update_matches_batchnorm_running_statistics(momentum):
    """Running statistics and num_batches_tracked as nn.BatchNorm2d leaves them, and the same
    outputs and gradients as the functional op."""
    x, w, b = _inputs(shape=(3, 4, 3, 5), seed=21)
    rm, rv = _running(4)
    nbt = torch.tensor(7, dtype=torch.long, device=DEVICE)
    ref_bn = torch.nn.BatchNorm2d(4, momentum=momentum, affine=False).double()
    with torch.no_grad():
        ref_bn.running_mean.copy_(rm)
        ref_bn.running_var.copy_(rv)
        ref_bn.num_batches_tracked.fill_(7)
    ref_bn(x.detach().double())
    out = B.bounded_batch_norm_train(x, w, b, EPS, SHIFT, True, rm, rv, nbt, momentum)
    plain = B.bounded_batch_norm_train(x, w, b, EPS, SHIFT, with_penalty=True)
    assert nbt.item() == 8
    torch.testing.assert_close(rm.double(), ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), ref_bn.running_var, rtol=1e-5, atol=1e-6)
    for a, e in zip(out, plain):
        torch.testing.assert_close(a, e)
    g = torch.randn(4, generator=_gen(22)).to(DEVICE)
    dy = torch.randn(x.shape, generator=_gen(23)).to(DEVICE)
    grads = torch.autograd.grad([out[0], out[3]], (x, w, b), [dy, g])
    ref = torch.autograd.grad([plain[0], plain[3]], (x, w, b), [dy, g])
    for a, e in zip(grads, ref):
        torch.testing.assert_close(a, e)


@needs_triton
def test_train_update_rejects_bad_buffers():
    x, w, b = _inputs(requires_grad=False)
    rm, rv = _running(3)
    with pytest.raises(ValueError, match="together"):
        B.bounded_batch_norm_train(x, w, b, EPS, 0.0, False, rm, None)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        B.bounded_batch_norm_train(x, w, b, EPS, 0.0, False, rm, rv, None, None)
    with pytest.raises(ValueError, match="momentum must be"):
        B.bounded_batch_norm_train(x, w, b, EPS, 0.0, False, rm, rv, None, 1.5)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        B.bounded_batch_norm_train(x, w, b, EPS, 0.0, False, rm[:2], rv, None, 0.1)


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [(True, True), (False, True), (False, False)], ids=str)
def test_opcheck_eval(channels_last, affine):
    x, w, b = _inputs(channels_last=channels_last)
    rm, rv = _running(x.shape[1])
    args = (x, rm, rv, w if affine[0] else None, b if affine[1] else None, EPS)
    torch.library.opcheck(ops.bounded_bn_eval.default, args)


@needs_triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]], ids=str)
def test_opcheck_backward(training, mask):
    x, w, _ = _inputs(requires_grad=False)
    dy = torch.randn(x.shape, generator=_gen(5)).contiguous(memory_format=torch.channels_last).to(DEVICE)
    mean, var = _running(x.shape[1])
    g = torch.randn(x.shape[1], generator=_gen(6)).to(DEVICE) if mask[1] else None
    args = (dy, x, mean, var, w, g, EPS, SHIFT, training, mask)
    torch.library.opcheck(ops.bounded_bn_backward.default, args)


# ---------------------------------------------------------------------------------------------
# Values against the eager reference, through the public wrappers.


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_train_matches_reference(channels_last):
    x, w, b = _inputs(shape=(3, 4, 3, 5), channels_last=channels_last, seed=11)
    g = torch.randn(4, generator=_gen(12)).to(DEVICE)
    y, mean, var, pen = B.bounded_batch_norm_train(x, w, b, EPS, SHIFT, with_penalty=True)
    assert y.stride() == x.stride() and y.dtype == x.dtype
    assert not mean.requires_grad and not var.requires_grad and pen.requires_grad
    dy = torch.randn(x.shape, generator=_gen(13)).to(DEVICE)
    grads = torch.autograd.grad((y * dy).sum() + (pen * g).sum(), (x, w, b))

    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref_y = RF.bounded_batch_norm(xd, None, None, wd, bd, True, 0.0, EPS)
    ref_pen = RF.receding_penalty_per_channel(wd, SHIFT)
    ref_grads = torch.autograd.grad((ref_y * dy.double()).sum() + (ref_pen * g.double()).sum(), (xd, wd, bd))
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref_y, **close)
    torch.testing.assert_close(mean.double(), xd.detach().mean((0, 2, 3)), **close)
    torch.testing.assert_close(var.double(), xd.detach().var((0, 2, 3), unbiased=False), **close)
    torch.testing.assert_close(pen.double(), ref_pen, **close)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), ref, **close)


@needs_triton
def test_train_without_penalty_or_params():
    x, w, b = _inputs(seed=21)
    y, mean, var, pen = B.bounded_batch_norm_train(x, None, None, EPS)
    assert pen.shape == (0,) and pen.dtype == torch.float32
    y2, _, _, pen2 = B.bounded_batch_norm_train(x, None, b, EPS, with_penalty=True)
    assert pen2.shape == (0,)  # no weight, no penalty
    ref = RF.bounded_batch_norm(x.detach().double(), None, None, None, None, True, 0.0, EPS)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    assert torch.isfinite(dx).all()


@needs_triton
def test_eval_matches_reference_and_ignores_running_grads():
    x, w, b = _inputs(shape=(2, 5, 3, 3), seed=31, channels_last=True)
    rm, rv = _running(5)
    rm.requires_grad_()
    y = B.bounded_batch_norm_eval(x, rm, rv, w, b, EPS)
    assert y.stride() == x.stride()
    dy = torch.randn(x.shape, generator=_gen(32)).to(DEVICE)
    gx, gw, gb, grm = torch.autograd.grad((y * dy).sum(), (x, w, b, rm), allow_unused=True)
    assert grm is None  # running statistics are constants
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = RF.bounded_batch_norm(xd, rm.detach().double(), rv.double(), wd, bd, False, 0.0, EPS)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), (xd, wd, bd))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for ours, r in zip((gx, gw, gb), ref_grads):
        torch.testing.assert_close(ours.double(), r, rtol=1e-5, atol=1e-5)


@needs_triton
def test_penalty_only_loss_and_empty_batch():
    """A loss of the penalty alone, and N = 0: dw is exactly g * dR/dw, statistics are 0."""
    x, w, b = _inputs(shape=(0, 3, 2, 2), seed=41)
    y, mean, var, pen = B.bounded_batch_norm_train(x, w, b, EPS, SHIFT, with_penalty=True)
    assert y.shape == x.shape
    assert torch.equal(mean, torch.zeros(3, device=DEVICE)) and torch.equal(var, torch.zeros(3, device=DEVICE))
    gx, gw, gb = torch.autograd.grad(pen.sum(), (x, w, b), allow_unused=True)
    torch.testing.assert_close(gw, RF.receding_penalty_grad(w.detach(), SHIFT))
    assert gb is None or torch.equal(gb, torch.zeros_like(gb))


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 (the kernels accumulate in float64 for float64 inputs).


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_train(channels_last):
    x, w, b = _inputs(shape=(2, 3, 2, 3), dtype=torch.float64, channels_last=channels_last, seed=51)

    def f(x, w, b):
        y, _, _, pen = ops.bounded_bn_train(x, w, b, EPS, SHIFT, True)
        return y, pen

    assert torch.autograd.gradcheck(f, (x, w, b))


@needs_triton
def test_gradcheck_train_bias_only():
    x, _, b = _inputs(shape=(3, 2, 2, 2), dtype=torch.float64, seed=52)
    assert torch.autograd.gradcheck(lambda x, b: ops.bounded_bn_train(x, None, b, EPS, 0.0, False)[0], (x, b))


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_eval(channels_last):
    x, w, b = _inputs(shape=(2, 3, 2, 3), dtype=torch.float64, channels_last=channels_last, seed=53)
    rm, rv = _running(3, torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.bounded_bn_eval(x, rm, rv, w, b, EPS), (x, w, b))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): same forward and backward as eager calls.


def _train_step(x, w, b, rm, rv):
    # Training forward with the in-kernel running update (rm, rv mutated), then eval on them.
    y, mean, var, pen = B.bounded_batch_norm_train(x, w, b, EPS, SHIFT, True, rm, rv, None, 0.2)
    z = B.bounded_batch_norm_eval(torch.relu(y), rm, rv, w, None, EPS)
    return (z * z).mean() + 0.1 * pen.sum(), mean, var


@needs_triton
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        x, w, b = _inputs(shape=(2, 3, 4, 5), seed=61, channels_last=True)
        rm, rv = _running(3)
        fn = torch.compile(_train_step, backend=backend, fullgraph=True) if compiled else _train_step
        loss, mean, var = fn(x, w, b, rm, rv)
        grads = torch.autograd.grad(loss, (x, w, b))
        results.append((loss, mean, var, rm, rv, *grads))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs: each names what is wrong (the fake kernels raise the same at trace time).


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda x, w, b: (x[0, 0, 0], w, b, EPS, 0.0, False), ValueError, "at least 2 dims"),
        (lambda x, w, b: (x.int(), None, None, EPS, 0.0, False), TypeError, "x must be float16"),
        (lambda x, w, b: (x, w[:2], b, EPS, 0.0, False), ValueError, "weight must have shape"),
        (lambda x, w, b: (x, w, b[None], EPS, 0.0, False), ValueError, "bias must have shape"),
        (lambda x, w, b: (x, w.int(), b, EPS, 0.0, False), TypeError, "weight must be a floating"),
        (lambda x, w, b: (x, w, b, -1.0, 0.0, False), ValueError, "eps must be"),
        (lambda x, w, b: (x, w, b, EPS, float("inf"), True), ValueError, "shift must be finite"),
        (lambda x, w, b: (x, w.to("meta"), b, EPS, 0.0, False), ValueError, "weight is on meta"),
    ],
)
def test_train_rejects_bad_inputs(make_args, error, match):
    x, w, b = _inputs(requires_grad=False)
    with pytest.raises(error, match=match):
        B.bounded_bn_train(*make_args(x, w, b))
    with pytest.raises(error, match=match):  # the fake kernel, as torch.compile would call it
        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
            B._bounded_bn_train_fake(*make_args(x, w, b))


def test_eval_and_backward_reject_bad_inputs():
    x, w, b = _inputs(requires_grad=False)
    rm, rv = _running(3)
    with pytest.raises(ValueError, match="running_var must have shape"):
        B.bounded_bn_eval(x, rm, rv[:1], w, b, EPS)
    dy = torch.ones_like(x)
    with pytest.raises(ValueError, match="dy must match x"):
        B.bounded_bn_backward(dy[:1], x, rm, rv, w, None, EPS, 0.0, True, [True, True, True])
    with pytest.raises(ValueError, match="asks for dw but weight is None"):
        B.bounded_bn_backward(dy, x, rm, rv, None, None, EPS, 0.0, True, [True, True, False])
    with pytest.raises(ValueError, match="penalty_grad given but weight is None"):
        B.bounded_bn_backward(dy, x, rm, rv, None, rm, EPS, 0.0, True, [True, False, False])
    with pytest.raises(ValueError, match="output_mask must hold 3"):
        B.bounded_bn_backward(dy, x, rm, rv, w, None, EPS, 0.0, True, [True])


def test_missing_triton_raises_with_install_hint(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    x, w, b = _inputs(requires_grad=False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        B.bounded_batch_norm_train(x, w, b, EPS)
    with pytest.raises(RuntimeError, match="pip install triton"):
        resolve_backend(x, "triton")


def test_package_imports_without_triton():
    """``rnip_ext`` and these ops import with Triton blocked; the backend then resolves to eager."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, rnip_ext, rnip_ext.ops.bounded_bn as B\n"
        "from rnip_ext._backend import resolve_backend, triton_available\n"
        "assert not triton_available()\n"
        "assert resolve_backend(torch.zeros(1, 1)) == 'eager'\n"
        "try:\n"
        "    B.bounded_batch_norm_train(torch.zeros(2, 1), None, None, 1e-5)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RNIP_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


# ---------------------------------------------------------------------------------------------
# Backend selection.


def test_resolve_backend(monkeypatch):
    cpu = torch.zeros(1, 1)
    monkeypatch.delenv("RNIP_BACKEND", raising=False)
    assert resolve_backend(cpu) == "eager"  # auto: CPU tensors go eager
    assert resolve_backend(cpu, "EAGER ") == "eager"
    monkeypatch.setenv("RNIP_BACKEND", "eager")
    assert resolve_backend(cpu, "auto") == "eager"
    monkeypatch.setenv("RNIP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RNIP_BACKEND.*triton, eager, auto"):
        resolve_backend(cpu)
    assert resolve_backend(cpu, "eager") == "eager"  # the argument overrides the environment
    with pytest.raises(ValueError, match="backend must be one of triton, eager, auto"):
        resolve_backend(cpu, "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(cpu, 3)


@needs_triton
def test_resolve_backend_triton_on_cpu(monkeypatch):
    cpu = torch.zeros(1, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(cpu, "triton") == "triton"
    monkeypatch.setenv("RNIP_BACKEND", "triton")
    assert resolve_backend(cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend(cpu)
    assert _backend._triton_ok is True  # probed once, cached


def test_resolve_backend_auto_on_cuda_meta(monkeypatch):
    """``auto`` picks Triton for CUDA tensors exactly when Triton is importable."""
    monkeypatch.delenv("RNIP_BACKEND", raising=False)

    class _Cuda:
        is_cuda = True
        device = torch.device("cuda")

    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert resolve_backend(_Cuda()) == "triton"
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert resolve_backend(_Cuda()) == "eager"


def test_resolve_backend_traces_under_compile(monkeypatch):
    """Modules call resolve_backend in forward: it must not break a fullgraph torch.compile."""
    monkeypatch.delenv("RNIP_BACKEND", raising=False)

    def f(x):
        return x + 1 if resolve_backend(x) == "eager" else x - 1

    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2))
    assert torch.equal(out, torch.ones(2))


@needs_triton
def test_train_update_rejects_bad_running_buffers():
    """The checks of the kernels' running-statistics arguments live in the ops, once."""
    x, w, b = _inputs(requires_grad=False)
    rm, rv = _running(3)
    nbt = torch.zeros((), dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        ops.bounded_bn_train_update(x, w, b, EPS, 0.0, False, rm, rv, None, None)
    strided = torch.zeros(6, device=DEVICE)[::2]
    with pytest.raises(ValueError, match="running_mean is updated in place and must be a contiguous"):
        ops.bounded_bn_train_update(x, w, b, EPS, 0.0, False, strided, rv, nbt, 0.1)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        ops.bounded_bn_train_update(x, w, b, EPS, 0.0, False, rm, None, nbt, 0.1)


# ---------------------------------------------------------------------------------------------
# The SyncBoundedBatchNorm2d pieces: local statistics, local sums, dx from given means.


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_sync_pieces_opcheck_and_match_the_reference(channels_last):
    x, w, _ = _inputs((3, 4, 5, 3), channels_last=channels_last, requires_grad=False)
    torch.library.opcheck(ops.bounded_bn_stats.default, (x, w, SHIFT, True))
    mean, var, pen = ops.bounded_bn_stats(x, w, SHIFT, True)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pen.double(), RF.receding_penalty_per_channel(w.double(), SHIFT), rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(x)
    g = torch.ones((), device=DEVICE).expand(4)
    args = (dy, x, mean, var, w, g, EPS, SHIFT, [True, False])
    torch.library.opcheck(ops.bounded_bn_backward_sums.default, args)
    sums, dw, db = ops.bounded_bn_backward_sums(*args)
    ref_dx, ref_dw, _ = ops.bounded_bn_backward(dy, x, mean, var, w, g, EPS, SHIFT, True, [True, True, False])
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[0], dy.double().sum((0, 2, 3)).float(), rtol=1e-5, atol=1e-5)
    assert db.shape == (0,)
    means = sums / (x.numel() // 4)
    torch.library.opcheck(ops.bounded_bn_backward_dx.default, (dy, x, mean, var, w, means, EPS))
    torch.testing.assert_close(ops.bounded_bn_backward_dx(dy, x, mean, var, w, means, EPS), ref_dx, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"means must be a floating-point \[2, C\]"):
        ops.bounded_bn_backward_dx(dy, x, mean, var, w, means[:1], EPS)
    with pytest.raises(ValueError, match="output_mask must hold 2 booleans"):
        ops.bounded_bn_backward_sums(dy, x, mean, var, w, None, EPS, SHIFT, [True, True, True])
