"""BoundedBatchNormAct2d: the bounded twin of timm's BatchNormAct2d, and its conversion."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import zoo_models
from convert_helpers import assert_same_function, count_activations, trained_looking
from rnip_ext import BoundedBatchNorm2d, convert_batchnorm, convert_sync_batchnorm, revert_sync_batchnorm
from rnip_ext.nn import BoundedBatchNormAct2d, SyncBoundedBatchNormAct2d, is_norm_act

timm = zoo_models.timm_module()
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (test extra)")


def layer(**kwargs):
    return BoundedBatchNormAct2d(6, bias=True, act=nn.SiLU(), drop=nn.Dropout(0.3), **kwargs)


def test_forward_is_act_of_drop_of_the_bounded_norm():
    norm_act = layer()
    plain = BoundedBatchNorm2d(6, bias=True)
    plain.load_state_dict(norm_act.state_dict())
    x = torch.randn(4, 6, 3, 3)
    for training in (True, False):
        norm_act.train(training), plain.train(training)
        torch.manual_seed(0)
        got = norm_act(x)
        torch.manual_seed(0)
        want = nn.functional.silu(nn.functional.dropout(plain(x), 0.3, training))
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(norm_act.running_mean, plain.running_mean)


def test_defaults_are_identities_and_bad_children_raise():
    bare = BoundedBatchNormAct2d(3)
    assert type(bare.act) is nn.Identity and type(bare.drop) is nn.Identity and is_norm_act(bare)
    with pytest.raises(TypeError, match="act must be an nn.Module or None, got str"):
        BoundedBatchNormAct2d(3, act="relu")
    with pytest.raises(TypeError, match="drop must be an nn.Module or None, got int"):
        SyncBoundedBatchNormAct2d(3, drop=1)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_keep_children_parameters_and_mode(clone):
    original = layer()
    original.act = nn.PReLU(6)  # an activation with a parameter of its own
    original.train()(torch.randn(4, 6, 2, 2))
    original.eval()
    copied = clone(original)
    assert type(copied) is BoundedBatchNormAct2d and not copied.training and type(copied.act) is nn.PReLU
    for (k, a), (_, b) in zip(original.state_dict().items(), copied.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 6, 2, 2)
    torch.testing.assert_close(copied(x), original(x))


def test_state_dict_round_trip_with_weights_only_load():
    source, target = layer(), layer()
    source.train()(torch.randn(4, 6, 3, 3))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(target.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert torch.equal(target.running_var, source.running_var)


def test_sync_conversion_round_trip_keeps_the_children_and_parameters():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), layer())
    act, weight = model[1].act, model[1].weight
    convert_sync_batchnorm(model)
    assert type(model[1]) is SyncBoundedBatchNormAct2d and model[1].act is act and model[1].weight is weight
    revert_sync_batchnorm(model)
    assert type(model[1]) is BoundedBatchNormAct2d and model[1].act is act and model[1].weight is weight


def test_is_norm_act_is_a_duck_type():
    class Mine(nn.BatchNorm2d):
        def __init__(self):
            super().__init__(3)
            self.drop, self.act = nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.act(self.drop(super().forward(x)))

    assert is_norm_act(Mine()) and not is_norm_act(nn.BatchNorm2d(3)) and not is_norm_act(nn.Sequential())
    # Our duck type is not enough to convert: an unknown class's forward may differ.
    with pytest.raises(TypeError, match="a BatchNorm2d subclass with its own forward"):
        convert_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1), Mine()))


@needs_timm
def test_from_batchnorm_keeps_timm_children():
    from timm.layers import BatchNormAct2d

    source = BatchNormAct2d(5, act_layer=nn.Hardswish)
    new = BoundedBatchNormAct2d.from_batchnorm(source, bias=True)
    assert new.act is source.act and new.drop is source.drop
    assert set(new.state_dict()) == set(source.state_dict())
    # The plain bounded layer would drop the activation: refused, never silently.
    with pytest.raises(TypeError, match="has its own forward.*convert_batchnorm"):
        BoundedBatchNorm2d.from_batchnorm(source)


@needs_timm
def test_a_silu_norm_act_layer_converts_below_one_and_is_refused_above():
    from timm.layers import BatchNormAct2d

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BatchNormAct2d(6, act_layer=nn.SiLU), nn.Conv2d(6, 2, 1))
    model = trained_looking(model, g, peak=0.95).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    assert type(converted[1].act) is nn.SiLU
    assert_same_function(model, converted, torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), rtol=1e-12)
    with torch.no_grad():
        model[1].weight[0] = -1.25
    with pytest.raises(ValueError, match=r"'1': \|gamma\| reaches 1.25 >= 1, .* reaches SiLU '1.act'"):
        convert_batchnorm(model)


@needs_timm
@pytest.mark.parametrize("name,peak", [("regnetx_002", 2.0), ("mobilenetv2_100", 2.0)])
def test_timm_norm_act_networks_keep_activations_and_function(name, peak):
    g = torch.Generator().manual_seed(0)
    model = trained_looking(zoo_models.build("timm", name), g, peak=peak, signed=False).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    norm_acts = [m for m in model.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert norm_acts and sum(type(m) is BoundedBatchNormAct2d for m in converted.modules()) == len(norm_acts)
    assert count_activations(converted) == count_activations(model)
    x = torch.randn(2, *zoo_models.input_size(name)[1:], generator=g, dtype=torch.float64)
    assert_same_function(model, converted, x, rtol=1e-9)


@needs_timm
def test_timm_sync_norm_act_becomes_sync_bounded_norm_act():
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import convert_sync_batchnorm as timm_sync

    model = timm_sync(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Conv2d(4, 2, 1)))
    act = model[1].act
    convert_batchnorm(model)
    assert type(model[1]) is SyncBoundedBatchNormAct2d and model[1].act is act
