"""BoundedBatchNorm2d on the Triton path (interpreter on CPU, compiled with RNIP_TEST_DEVICE=cuda)
matches the eager layer, and the fused regulariser gradient matches the reference formulation."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnip_ext import BoundedBatchNorm2d, RecedingRegularizer
from rnip_ext import functional as RF
from rnip_ext._backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = torch.device(os.environ.get("RNIP_TEST_DEVICE", "cpu"))


def pair(c, **kwargs):
    """The same layer twice: on the Triton path and on the eager path."""
    fast = BoundedBatchNorm2d(c, device=DEVICE, backend="triton", **kwargs)
    slow = BoundedBatchNorm2d(c, device=DEVICE, backend="eager", **kwargs)
    with torch.no_grad():
        if fast.bias is not None:
            fast.bias.normal_()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_and_eval_match_the_eager_layer(momentum, bias, channels_last):
    fast, slow = pair(5, momentum=momentum, bias=bias)
    for step in range(3):
        x = torch.randn(3, 5, 4, 3, device=DEVICE) * (step + 1) + step
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = fast(x)
        torch.testing.assert_close(y, slow(x), rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(fast.running_mean, slow.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.running_var, slow.running_var, rtol=1e-5, atol=1e-6)
        assert int(fast.num_batches_tracked) == int(slow.num_batches_tracked) == step + 1
    fast.eval(), slow.eval()
    x = torch.randn(2, 5, 3, 3, device=DEVICE)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


def test_no_running_stats_and_empty_batch():
    fast, slow = pair(3, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2, device=DEVICE)
    torch.testing.assert_close(fast.eval()(x), slow.eval()(x), rtol=1e-5, atol=1e-5)
    fast, slow = pair(3)
    before = fast.running_mean.clone()
    assert fast(torch.randn(0, 3, 2, 2, device=DEVICE)).shape == (0, 3, 2, 2)
    assert torch.equal(fast.running_mean, before) and int(fast.num_batches_tracked) == 1


def model_pair(backend_a="triton", backend_b="eager"):
    def make(backend):
        torch.manual_seed(1234)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            BoundedBatchNorm2d(6, backend=backend),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 4, 1, bias=False),
            BoundedBatchNorm2d(4, backend=backend, bias=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        ).to(DEVICE)

    return make(backend_a), make(backend_b)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_fused_penalty_gradient_matches_reference_under_loss_scaling_and_accumulation(scale):
    fused, ref = model_pair()
    with torch.no_grad():  # some logits low enough for the penalty to matter
        fused[1].weight.add_(-2.0)
        ref[1].weight.add_(-2.0)
    reg = RecedingRegularizer(fused, strength=0.05, shift=1.0, normalize=None)
    assert reg.fused
    batches = [(torch.randn(4, 3, 5, 5, device=DEVICE), torch.randint(3, (4,), device=DEVICE)) for _ in range(2)]
    for x, y in batches:  # two micro-batches accumulated, loss weighted by 1/2 and scaled
        loss = (F.cross_entropy(fused(x), y) + reg()) * 0.5 * scale
        assert not fused[1].has_recorded_penalty  # consumed by reg()
        loss.backward()
        ref_loss = F.cross_entropy(ref(x), y) + 0.05 * (
            RF.receding_penalty(ref[1].weight, 1.0) + RF.receding_penalty(ref[4].weight, 1.0)
        )
        (ref_loss * 0.5 * scale).backward()
    for g_fused, g_ref in zip(grads(fused), grads(ref)):
        torch.testing.assert_close(g_fused / scale, g_ref / scale, rtol=1e-4, atol=1e-6)


def test_fused_penalty_gradient_with_a_real_grad_scaler():
    fused, ref = model_pair()
    reg = RecedingRegularizer(fused, strength=0.05, shift=0.0, normalize=None)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    x, y = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randint(3, (4,), device=DEVICE)
    scaler.scale(F.cross_entropy(fused(x), y) + reg()).backward()
    scaler.unscale_(torch.optim.SGD(fused.parameters(), lr=0.0))
    ref_loss = F.cross_entropy(ref(x), y) + 0.05 * (
        RF.receding_penalty(ref[1].weight, 0.0) + RF.receding_penalty(ref[4].weight, 0.0)
    )
    ref_loss.backward()
    for g_fused, g_ref in zip(grads(fused), grads(ref)):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-6)


def test_value_equals_the_eager_penalty_and_is_zero_gradient_when_unused():
    fused, _ = model_pair()
    reg = RecedingRegularizer(fused, strength=0.1, shift=0.0, normalize=None)
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    out = fused(x)
    assert fused[1].has_recorded_penalty
    expected = 0.1 * (RF.receding_penalty(fused[1].weight, 0.0) + RF.receding_penalty(fused[4].weight, 0.0))
    torch.testing.assert_close(reg(), expected.detach(), rtol=1e-5, atol=1e-6)
    # A forward whose penalty never enters the loss: the logits get only the data gradient.
    fused.zero_grad()
    out = fused(x)
    out.sum().backward()
    with_data_only = fused[1].weight.grad.clone()
    _, eager = model_pair("eager", "eager")
    eager(x).sum().backward()
    torch.testing.assert_close(with_data_only, eager[1].weight.grad, rtol=1e-4, atol=1e-6)
    # A copy of a layer that recorded a penalty can still be deep-copied and pickled.
    fused(x)
    copied = copy.deepcopy(fused)
    assert not copied[1].has_recorded_penalty and copied[1].penalty_shift is None


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_torch_compile_fullgraph_gives_the_same_results(backend):
    torch._dynamo.reset()
    model, reference = model_pair(backend, "eager")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    out, expected = compiled(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=1e-5, atol=1e-6)


def test_penalty_record_is_never_used_stale():
    fused, _ = model_pair()
    reg = RecedingRegularizer(fused, strength=0.1, shift=0.0, normalize=None)
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 5, 5, device=DEVICE), torch.randint(3, (4,), device=DEVICE)

    def eager_value():
        return 0.1 * (RF.receding_penalty(fused[1].weight, 0.0) + RF.receding_penalty(fused[4].weight, 0.0))

    # The regulariser evaluated before the forward, step after step (the previous record's graph
    # is gone and its weights are old): it must recompute, never raise or reuse.
    for _ in range(2):
        opt.zero_grad()
        penalty = reg()
        torch.testing.assert_close(penalty, eager_value(), rtol=1e-6, atol=1e-7)
        (penalty + F.cross_entropy(fused(x), y)).backward()
        opt.step()
    # A record made before an in-place weight change is dropped.
    fused(x)
    with torch.no_grad():
        fused[1].weight.sub_(1.0)
    torch.testing.assert_close(reg(), eager_value().detach(), rtol=1e-6, atol=1e-7)


def test_penalty_recorded_only_by_training_forwards_with_grad():
    layer = BoundedBatchNorm2d(3, device=DEVICE, backend="triton", track_running_stats=False)
    RecedingRegularizer(nn.Sequential(layer), strength=0.1, shift=0.0, normalize=None)
    x = torch.randn(4, 3, 2, 2, device=DEVICE)
    layer(x)
    assert layer.has_recorded_penalty
    with torch.no_grad():
        layer(x)  # a validation pass drops the record (and the graph it held)
    assert not layer.has_recorded_penalty
    layer.eval()(x)  # batch statistics in eval (no running stats), but no penalty
    assert not layer.has_recorded_penalty


def test_one_value_per_channel_in_training_raises_on_the_triton_path():
    layer = BoundedBatchNorm2d(4, device=DEVICE, backend="triton")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 4, 1, 1, device=DEVICE))
    assert torch.equal(layer.running_var, torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_triton_training_step_reads_no_tensor_value_on_the_host(monkeypatch, momentum):
    """The layer's Triton training step -- forward with the fused penalty, ``reg()``, backward --
    with every kernel launch intercepted (what the host does while a CUDA graph is captured)
    never reads a tensor value into Python: no synchronisation, nothing that stops a capture.
    The launches it makes are all planned before any runs (the cached plans)."""
    from rnip_ext.kernels._variants import recorded_launches

    layer = BoundedBatchNorm2d(6, momentum=momentum, device=DEVICE, backend="triton")
    reg = RecedingRegularizer(nn.Sequential(layer), 1e-3, 3.0, normalize=None)
    one = torch.ones((), device=DEVICE)
    with recorded_launches(run=False) as launches:
        for shape in ((8, 6, 4, 4), (4, 6, 48, 48)):  # single-pass, chunked
            x = torch.randn(shape, device=DEVICE, requires_grad=True)
            dy = torch.randn(shape, device=DEVICE)
            torch.autograd.backward([layer(x), reg()], [dy, one])  # first call: plans are made
            with monkeypatch.context() as refuse:
                for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
                    refuse.setattr(torch.Tensor, name, _refuse_host_read)
                torch.autograd.backward([layer(x), reg()], [dy, one])
    assert len(launches) == 2 * (1 + 1) + 2 * (3 + 3)


def _refuse_host_read(*args, **kwargs):
    raise AssertionError("a tensor value was read on the host")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("shape", [(8, 16, 4, 4), (4, 4, 48, 48)], ids=["single_pass", "chunked"])
def test_training_step_captures_in_a_cuda_graph(shape):
    """A training step (forward with the fused penalty, ``reg()``, backward) captured in a CUDA
    graph and replayed on new data gives what the same step gives eagerly: outputs, gradients,
    running statistics and num_batches_tracked, which the captured kernels update."""
    c = shape[1]
    layer = BoundedBatchNorm2d(c, device="cuda", backend="triton")
    reg = RecedingRegularizer(nn.Sequential(layer), 1e-3, 3.0, normalize=None)
    static_x = torch.randn(shape, device="cuda", requires_grad=True)
    static_dy = torch.randn(shape, device="cuda")
    one = torch.ones((), device="cuda")

    def step(model, regulariser, x):
        y = model(x)
        torch.autograd.backward([y, regulariser()], [static_dy, one])
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, plans, allocator pools) off the capture
        for _ in range(3):
            static_x.grad = layer.weight.grad = None
            step(layer, reg, static_x)
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = layer.weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(layer, reg, static_x)
    twin = copy.deepcopy(layer)
    twin.weight.grad = None
    twin_reg = RecedingRegularizer(nn.Sequential(twin), 1e-3, 3.0, normalize=None)
    with torch.no_grad():
        static_x.copy_(torch.randn(shape, device="cuda") * 2 + 1)
    graph.replay()
    x = static_x.detach().clone().requires_grad_(True)
    y = step(twin, twin_reg, x)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, y)
    torch.testing.assert_close(static_x.grad, x.grad)
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad)
    torch.testing.assert_close(layer.running_mean, twin.running_mean)
    torch.testing.assert_close(layer.running_var, twin.running_var)
    assert torch.equal(layer.num_batches_tracked, twin.num_batches_tracked)
