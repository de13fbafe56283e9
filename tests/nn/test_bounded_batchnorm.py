"""BoundedBatchNorm2d behaves as nn.BatchNorm2d with scale sigmoid(weight), in every mode."""

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rnip_ext import BoundedBatchNorm2d

# Tolerances of the layer output against the float64 reference, per input dtype.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def twin_batchnorm(layer: BoundedBatchNorm2d, dtype=None) -> nn.BatchNorm2d:
    """A plain nn.BatchNorm2d that should compute exactly what ``layer`` computes."""
    ref = nn.BatchNorm2d(
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.affine,
        layer.track_running_stats,
        dtype=dtype or (layer.weight.dtype if layer.weight is not None else torch.float32),
    )
    with torch.no_grad():
        if layer.affine:
            ref.weight.copy_(torch.sigmoid(layer.weight))
            ref.bias.copy_(layer.bias if layer.bias is not None else torch.zeros_like(ref.bias))
        if layer.track_running_stats:
            ref.running_mean.copy_(layer.running_mean)
            ref.running_var.copy_(layer.running_var)
            ref.num_batches_tracked.copy_(layer.num_batches_tracked)
    ref.train(layer.training)
    return ref


def assert_same_buffers(layer, ref):
    if layer.track_running_stats:
        torch.testing.assert_close(layer.running_mean, ref.running_mean.to(layer.running_mean.dtype))
        torch.testing.assert_close(layer.running_var, ref.running_var.to(layer.running_var.dtype))
        assert layer.num_batches_tracked.dtype == torch.int64
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)
    else:
        assert layer.running_mean is None and layer.running_var is None
        assert layer.num_batches_tracked is None


# --- construction -------------------------------------------------------------------------------


# torch 2.13 gave nn.BatchNorm2d a keyword-only `bias`; the layer has it on every torch.
TORCH_BN_TAKES_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def torch_batchnorm2d(num_features, bias, **kwargs):
    """``nn.BatchNorm2d`` with or without its shift, on torch releases before and after 2.13."""
    if TORCH_BN_TAKES_BIAS:
        return nn.BatchNorm2d(num_features, bias=bias, **kwargs)
    bn = nn.BatchNorm2d(num_features, **kwargs)
    if not bias:
        bn.bias = None
    return bn


def test_signature_matches_batchnorm2d_except_bias_default():
    ours = inspect.signature(BoundedBatchNorm2d.__init__).parameters
    theirs = inspect.signature(nn.BatchNorm2d.__init__).parameters
    # torch's arguments in torch's order, then only keyword-only extras.
    assert list(ours)[: len(theirs)] == list(theirs)
    assert list(ours)[len(theirs):] == ([] if TORCH_BN_TAKES_BIAS else ["bias"]) + ["backend"]
    assert ours["bias"].kind == inspect.Parameter.KEYWORD_ONLY
    assert ours["backend"].kind == inspect.Parameter.KEYWORD_ONLY and ours["backend"].default is None
    for name in theirs:
        assert ours[name].kind == theirs[name].kind, name
        if name != "bias":
            assert ours[name].default == theirs[name].default, name
    assert ours["bias"].default is False


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("track", [False, True])
def test_state_dict_keys_match_batchnorm2d(bias, affine, track):
    ours = BoundedBatchNorm2d(5, affine=affine, track_running_stats=track, bias=bias)
    theirs = torch_batchnorm2d(5, bias and affine, affine=affine, track_running_stats=track)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert (ours.bias is None) == (not bias or not affine)


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False), (True, True)])
def test_construction_without_normbase_bias_keyword(monkeypatch, affine, bias):
    # torch < 2.13 has no `bias` in _NormBase: the layer drops the shift itself, to the same state.
    from rnip_ext.nn import bounded_batchnorm

    torch.manual_seed(3)
    expected = BoundedBatchNorm2d(6, affine=affine, bias=bias)
    monkeypatch.setattr(bounded_batchnorm, "_NORMBASE_TAKES_BIAS", False)
    torch.manual_seed(3)
    old = BoundedBatchNorm2d(6, affine=affine, bias=bias)
    assert [n for n, _ in old.named_parameters()] == [n for n, _ in expected.named_parameters()]
    assert list(old.state_dict()) == list(expected.state_dict())
    for name, value in expected.state_dict().items():
        assert torch.equal(old.state_dict()[name], value), name
    assert repr(old) == repr(expected)
    x = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(old(x), expected(x), rtol=0, atol=0)


def test_weight_initialised_standard_normal_and_bias_zero():
    layer = BoundedBatchNorm2d(20000, bias=True)
    w = layer.weight.detach()
    assert abs(w.mean().item()) < 0.05
    assert abs(w.std().item() - 1.0) < 0.05
    assert torch.equal(layer.bias.detach(), torch.zeros(20000))
    # Two layers draw different weights: the init is random, not a constant.
    assert not torch.equal(BoundedBatchNorm2d(8).weight, BoundedBatchNorm2d(8).weight)


def test_factory_kwargs_and_conversions():
    layer = BoundedBatchNorm2d(4, device="cpu", dtype=torch.float64, bias=True)
    for t in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
        assert t.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.int64
    meta = BoundedBatchNorm2d(4, device="meta")
    assert meta.weight.is_meta and meta.running_var.is_meta
    half = BoundedBatchNorm2d(4).half()
    assert half.weight.dtype == torch.float16 and half.num_batches_tracked.dtype == torch.int64
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    assert BoundedBatchNorm2d(4).to(torch.float64)(x).dtype == torch.float64


def test_extra_repr_matches_batchnorm2d():
    for kwargs in ({}, {"momentum": None, "affine": False}, {"eps": 1e-3, "track_running_stats": False}):
        ours = repr(BoundedBatchNorm2d(7, **kwargs))
        theirs = repr(nn.BatchNorm2d(7, **kwargs))
        if TORCH_BN_TAKES_BIAS:
            theirs = theirs.replace("bias=True", "bias=False")
        else:  # torch < 2.13 does not print the shift: the layer adds it after affine
            theirs = theirs.replace("track_running_stats", "bias=False, track_running_stats")
        assert ours == theirs.replace("BatchNorm2d", "BoundedBatchNorm2d")
    assert "bias=True" in repr(BoundedBatchNorm2d(7, bias=True))


# --- forward against nn.BatchNorm2d with scale sigmoid(weight) ----------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("bias", [False, True])
def test_training_steps_match_reference_in_float64(momentum, bias):
    layer = BoundedBatchNorm2d(6, momentum=momentum, dtype=torch.float64, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    ref = twin_batchnorm(layer)
    for step in range(4):
        x = torch.randn(5, 6, 3, 7, dtype=torch.float64) * (step + 1) + step
        torch.testing.assert_close(layer(x), ref(x), **TOL[torch.float64])
        assert_same_buffers(layer, ref)
    assert int(layer.num_batches_tracked) == 4
    # Unbiased running variance: after one step from a fresh layer with momentum 1 the buffer
    # holds the batch's unbiased variance exactly.
    fresh = BoundedBatchNorm2d(6, momentum=1.0, dtype=torch.float64)
    x = torch.randn(5, 6, 3, 7, dtype=torch.float64)
    fresh(x)
    torch.testing.assert_close(fresh.running_var, x.transpose(0, 1).reshape(6, -1).var(dim=1))
    torch.testing.assert_close(fresh.running_mean, x.mean(dim=(0, 2, 3)))


def test_cumulative_average_when_momentum_is_none():
    layer = BoundedBatchNorm2d(3, momentum=None, dtype=torch.float64)
    batches = [torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3 + 1 for _ in range(5)]
    for x in batches:
        layer(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    variances = torch.stack([x.transpose(0, 1).reshape(3, -1).var(dim=1) for x in batches])
    # running = 0 * init + mean of the batch statistics (the first step has factor 1/1).
    torch.testing.assert_close(layer.running_mean, means.mean(0))
    torch.testing.assert_close(layer.running_var, variances.mean(0))


def test_eval_uses_running_statistics_and_leaves_them_alone():
    layer = BoundedBatchNorm2d(4, dtype=torch.float64, bias=True)
    nn.init.normal_(layer.bias)
    for _ in range(3):
        layer(torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1)
    layer.eval()
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = torch.sigmoid(layer.weight)[:, None, None] * (
        x - layer.running_mean[:, None, None]
    ) / torch.sqrt(layer.running_var[:, None, None] + layer.eps) + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    # A single value per channel is fine in eval mode.
    assert layer(torch.randn(1, 4, 1, 1, dtype=torch.float64)).shape == (1, 4, 1, 1)


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_uses_batch_statistics_in_both_modes(training):
    layer = BoundedBatchNorm2d(3, track_running_stats=False, dtype=torch.float64)
    layer.train(training)
    ref = twin_batchnorm(layer)
    x = torch.randn(4, 3, 6, 2, dtype=torch.float64) * 4 - 2
    torch.testing.assert_close(layer(x), ref(x))
    assert layer.running_mean is None and layer.num_batches_tracked is None
    out = layer(x)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_affine_false_is_scale_one_no_shift():
    layer = BoundedBatchNorm2d(3, affine=False, dtype=torch.float64)
    assert layer.weight is None and layer.bias is None
    assert list(layer.parameters()) == []
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = F.batch_norm(x, None, None, None, None, True, 0.1, layer.eps)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.importance, torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mixed_precision_output_dtype_and_fp32_statistics(dtype, channels_last):
    layer = BoundedBatchNorm2d(5)
    ref = twin_batchnorm(layer, dtype=torch.float64)
    x = torch.randn(6, 5, 4, 3) * 2 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert layer.running_mean.dtype == torch.float32 and layer.weight.dtype == torch.float32
    # Compare with the float64 computation on the same (rounded) input.
    expected = ref(x.to(dtype).double())
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])
    torch.testing.assert_close(layer.running_mean.double(), ref.running_mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer.running_var.double(), ref.running_var, rtol=1e-3, atol=1e-3)


def test_channels_last_in_gives_channels_last_out():
    layer = BoundedBatchNorm2d(8)
    x = torch.randn(3, 8, 5, 5).to(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, twin_batchnorm(layer)(x.contiguous()))
    layer.eval()
    assert layer(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False])
def test_zero_size_batch_behaves_like_batchnorm2d(training):
    layer = BoundedBatchNorm2d(3)
    ref = twin_batchnorm(layer)
    layer.train(training)
    ref.train(training)
    x = torch.randn(0, 3, 4, 4)
    y = layer(x)
    assert y.shape == (0, 3, 4, 4)
    ref(x)
    assert_same_buffers(layer, ref)


# --- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_float64(training, bias):
    layer = BoundedBatchNorm2d(3, dtype=torch.float64, bias=bias).train(training)
    layer.running_var.uniform_(0.5, 2.0)
    layer.running_mean.normal_()
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [layer.weight] + ([layer.bias] if bias else [])

    def fn(x, *ps):
        saved = {n: p for n, p in zip(["weight", "bias"], ps)}
        return torch.func.functional_call(layer, saved, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_gradients_match_reference():
    layer = BoundedBatchNorm2d(4, dtype=torch.float64, bias=True)
    ref_w = layer.weight.detach().clone().requires_grad_()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    layer(x).backward(dy)
    F.batch_norm(x_ref, None, None, ref_w.sigmoid(), layer.bias.detach(), True).backward(dy)
    torch.testing.assert_close(layer.weight.grad, ref_w.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, dy.sum(dim=(0, 2, 3)))


# --- property test over shapes, dtypes, layouts and modes ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 9),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    channels_last=st.booleans(),
    training=st.booleans(),
    bias=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.9, None]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(n, c, h, w, dtype, channels_last, training, bias, track, momentum, seed):
    if (training or not track) and n * h * w == 1:
        n = 2  # one value per channel is rejected with batch statistics (tested separately)
    gen = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    layer = BoundedBatchNorm2d(c, momentum=momentum, track_running_stats=track, bias=bias, dtype=param_dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(c, generator=gen) * 2)
        if bias:
            layer.bias.copy_(torch.randn(c, generator=gen))
        if track:
            layer.running_mean.copy_(torch.randn(c, generator=gen))
            layer.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    layer.train(training)
    ref = twin_batchnorm(layer, dtype=torch.float64)
    x = (torch.randn(n, c, h, w, generator=gen) * 3 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last and dtype != torch.float64:
        assert y.is_contiguous(memory_format=torch.channels_last) or min(h, w, c) == 1 or h * w == 1
    expected = ref(x.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
    if track:
        torch.testing.assert_close(layer.running_mean.double(), ref.running_mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(layer.running_var.double(), ref.running_var, rtol=1e-3, atol=1e-3)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)


# --- state: copies, pickling, loading, resets ------------------------------------------------------


def trained_layer(**kwargs) -> BoundedBatchNorm2d:
    layer = BoundedBatchNorm2d(4, **kwargs)
    for _ in range(2):
        layer(torch.randn(3, 4, 5, 5) * 2 + 1)
    return layer


@pytest.mark.parametrize("clone", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_preserve_everything(clone):
    layer = trained_layer(bias=True, momentum=None)
    other = copy.deepcopy(layer) if clone == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert type(other) is BoundedBatchNorm2d
    assert other.momentum is None and other.bias is not None
    for key, value in layer.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(other.eval()(x), layer.eval()(x), rtol=0, atol=0)
    other.weight.data.add_(1.0)
    assert not torch.equal(other.weight, layer.weight)  # a copy, not an alias


def test_state_dict_round_trip_with_weights_only_load():
    layer = trained_layer()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = BoundedBatchNorm2d(4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in layer.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_loads_old_state_dict_without_num_batches_tracked():
    layer = trained_layer()
    state = layer.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    fresh = BoundedBatchNorm2d(4)
    fresh.num_batches_tracked.fill_(7)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.running_mean, layer.running_mean)
    # The pre-version-2 rule of nn.BatchNorm2d: the layer keeps its own counter.
    assert int(fresh.num_batches_tracked) == 7
    # A version-2 state_dict that lacks the key is an error, as for nn.BatchNorm2d.
    state = layer.state_dict()
    del state["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        BoundedBatchNorm2d(4).load_state_dict(state)


def test_reset_running_stats_and_parameters():
    layer = trained_layer(bias=True)
    nn.init.normal_(layer.bias)
    old_weight = layer.weight.detach().clone()
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(4))
    assert torch.equal(layer.running_var, torch.ones(4))
    assert int(layer.num_batches_tracked) == 0
    layer(torch.randn(2, 4, 3, 3))
    layer.reset_parameters()
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(4))
    assert torch.equal(layer.bias.detach(), torch.zeros(4))
    assert not torch.equal(layer.weight.detach(), old_weight)


def test_importance_is_detached_sigmoid_of_weight():
    layer = BoundedBatchNorm2d(6)
    imp = layer.importance
    assert not imp.requires_grad
    torch.testing.assert_close(imp, torch.sigmoid(layer.weight.detach()))
    assert ((imp > 0) & (imp < 1)).all()


# --- interplay with torch tools --------------------------------------------------------------------


def test_convert_sync_batchnorm_leaves_bounded_layers_untouched():
    layer = BoundedBatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.BatchNorm2d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted[1] is layer  # not replaced by a SyncBatchNorm reading the logit as a scale
    assert isinstance(converted[2], nn.SyncBatchNorm)
    assert not isinstance(layer, nn.modules.batchnorm._BatchNorm)


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4), (2, 3, 4, 4, 1)])
def test_wrong_rank_raises_value_error_naming_it(shape):
    with pytest.raises(ValueError, match=rf"expected 4D input \(got {len(shape)}D input\)"):
        BoundedBatchNorm2d(3)(torch.randn(*shape))


def test_one_value_per_channel_in_training_raises():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        BoundedBatchNorm2d(3)(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("affine,track", [(True, True), (False, False)])
def test_channel_mismatch_raises_value_error(affine, track):
    layer = BoundedBatchNorm2d(3, affine=affine, track_running_stats=track)
    with pytest.raises(ValueError, match="expected input with 3 channels.*got 5 channels"):
        layer(torch.randn(2, 5, 4, 4))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("inf"), float("nan")])
def test_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps"):
        BoundedBatchNorm2d(3, eps=eps)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="bias=True needs affine=True"):
        BoundedBatchNorm2d(3, affine=False, bias=True)
    with pytest.raises(ValueError, match="num_features"):
        BoundedBatchNorm2d(0)
    with pytest.raises(TypeError, match="num_features"):
        BoundedBatchNorm2d(3.0)
    with pytest.raises(ValueError, match="momentum"):
        BoundedBatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="backend must be one of"):
        BoundedBatchNorm2d(3, backend="cuda")


@pytest.mark.parametrize(
    "param_dtype,input_dtype",
    [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.float64, torch.float16)],
)
def test_unsupported_dtype_mix_raises_type_error(param_dtype, input_dtype):
    layer = BoundedBatchNorm2d(3, dtype=param_dtype)
    with pytest.raises(TypeError, match=f"input dtype {input_dtype}.*parameters.*{param_dtype}"):
        layer(torch.randn(2, 3, 2, 2).to(input_dtype))


def test_non_tensor_and_integer_inputs_raise_type_error():
    with pytest.raises(TypeError, match="Tensor"):
        BoundedBatchNorm2d(3)([[1.0]])
    with pytest.raises(TypeError, match="floating-point"):
        BoundedBatchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.int64))


def test_parametrized_weight_is_used_on_the_eager_path():
    """The eager path reads parameters by dict lookup for speed; a parametrised ``weight``
    (``torch.nn.utils.parametrize``) is not in that dict and must still be honoured."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = BoundedBatchNorm2d(4, backend="eager")
    parametrize.register_parametrization(layer, "weight", Double())
    x = torch.randn(3, 4, 2, 2)
    original = layer.parametrizations.weight.original
    from rnip_ext.functional import bounded_batch_norm

    expected = bounded_batch_norm(x, None, None, 2 * original, None, True, 0.1, 1e-5)
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0


def test_penalty_attachment_is_public_validated_and_not_copied():
    """attach_penalty / penalty_shift / has_recorded_penalty / take_recorded_penalty: the API a
    regulariser uses (the eager path records nothing)."""
    layer = BoundedBatchNorm2d(3)
    assert layer.penalty_shift is None and not layer.has_recorded_penalty
    layer.attach_penalty(2)
    assert layer.penalty_shift == 2.0 and isinstance(layer.penalty_shift, float)
    layer(torch.randn(4, 3, 2, 2))
    assert not layer.has_recorded_penalty and layer.take_recorded_penalty(2.0) is None
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.penalty_shift is None  # a copy is not bound to the original's regulariser
    with pytest.raises(ValueError, match="finite"):
        layer.attach_penalty(float("nan"))
    layer.attach_penalty(None)
    assert layer.penalty_shift is None


@pytest.fixture
def refuse_host_reads(monkeypatch):
    """Any read of a tensor's value into Python (a device synchronisation on CUDA) fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_training_step_reads_no_tensor_value_on_the_host(refuse_host_reads, monkeypatch, momentum):
    """The eager training step (momentum=None included: its factor 1 / num_batches_tracked stays
    a tensor, no float(count)) and eval read no value on the host: nothing to synchronise, and
    nothing that stops a CUDA graph capture."""
    layer = BoundedBatchNorm2d(3, momentum=momentum, dtype=torch.float64, bias=True)
    ref = twin_batchnorm(layer)
    batches = [torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True) * (i + 1) for i in range(3)]
    for x in batches:
        layer(x).sum().backward()
    layer.eval()
    layer(x)
    monkeypatch.undo()  # nn.BatchNorm2d itself calls float(num_batches_tracked) for momentum=None
    for x in batches:
        ref(x.detach())
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.num_batches_tracked, torch.tensor(3))


def test_eval_map_is_folded_once_and_refolded_after_any_change():
    """Eval without autograd runs ``x * A + B`` with ``A``, ``B`` folded from the parameters and
    running statistics once; every change (an optimiser step, a training step, load_state_dict,
    eps, a dtype conversion) refolds them: the output always equals the reference."""
    layer = BoundedBatchNorm2d(5, bias=True, dtype=torch.float64)
    nn.init.normal_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)

    def check(x):
        ref = twin_batchnorm(layer, dtype=x.dtype).eval()
        with torch.no_grad():
            y = layer.eval()(x)
            torch.testing.assert_close(y, ref(x), rtol=1e-12 if x.dtype == torch.float64 else 1e-5, atol=1e-6)
        assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
        return y

    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    check(x)
    first = layer._eval_cache[1]
    check(x * 2)
    assert layer._eval_cache[1] is first  # nothing changed: the folded map is reused
    layer.train()(x).sum().backward()  # running statistics move
    check(x)
    opt.step()  # weight and bias change in place
    check(x)
    layer.load_state_dict({k: v * 1.5 for k, v in layer.state_dict().items()})
    check(x)
    layer.eps = 0.1
    check(x)
    layer.float()
    check(x.float().contiguous(memory_format=torch.channels_last))


def test_eval_with_autograd_keeps_the_gradient():
    layer = BoundedBatchNorm2d(3, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
