"""convert_batchnorm keeps a trained network's function: gammas of both signs and near zero, through
residual additions and concatenations, in ResNets, MobileNets and VGGs, in eval and training mode."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convert_helpers import assert_same_function, count_activations, outputs, trained_looking
from rnip_ext import BoundedBatchNorm2d, convert_batchnorm
from rnip_ext import models as M
from rnip_ext.nn.fold import smallest_scale

FAMILIES = [
    ("resnet18", lambda: M.resnet18(num_classes=10, bn="plain"), (4, 3, 32, 32)),
    ("resnet50", lambda: M.resnet50(num_classes=10, bn="plain"), (4, 3, 32, 32)),
    ("resnet20_cifar", lambda: M.resnet_cifar(20, bn="plain"), (4, 3, 16, 16)),  # zero-padded shortcuts
    ("mobilenet_v2", lambda: M.mobilenet_v2(num_classes=10, width_mult=0.35, bn="plain"), (4, 3, 32, 32)),
    ("vgg_small", lambda: M.vgg_small(bn="plain"), (4, 3, 16, 16)),
    ("vgg_dropout", lambda: M.VGG(M.vgg.make_features((8, "M", 16, "M"), "plain"), nn.AdaptiveAvgPool2d(2),
                                  nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 5))),
     (4, 3, 16, 16)),  # a 2x2 flatten into a Linear, dropout in training mode
]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,build,shape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_families_keep_their_function_in_float64(name, build, shape):
    g = generator()
    model = trained_looking(build(), g).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    assert count_activations(converted) == count_activations(model)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    assert_same_function(model, converted, x, rtol=1e-9)


def test_float32_error_is_that_of_rounding():
    """In float32 the converted network is as close to the float64 truth as the original is."""
    g = generator()
    model = trained_looking(M.resnet18(num_classes=10, bn="plain"), g)
    truth = copy.deepcopy(model).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    x = torch.randn(4, 3, 32, 32, generator=g)
    for training in (False, True):
        want = outputs(truth, x.double(), training)
        ours = (outputs(converted, x, training).double() - want).abs().max()
        theirs = (outputs(model, x, training).double() - want).abs().max()
        assert ours <= 4 * theirs + 1e-6 * want.abs().max(), (training, ours, theirs)


def test_importance_reads_tiny_and_zero_gammas_as_receded():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.75, 1e-7, -1e-7, 0.0, 0.3]))
    convert_batchnorm(model)
    bn = model[1]
    c = 2.0 * 1.5  # headroom * max |gamma|
    torch.testing.assert_close(bn.importance, torch.tensor([1.5, 0.75, 1e-7, 1e-7, 0.0, 0.3]) / c,
                               atol=2 * smallest_scale(torch.float32), rtol=1e-6)
    assert bn.importance[2:5].max() < 1e-7 and torch.isfinite(bn.weight).all()
    assert bn.importance[4] == pytest.approx(smallest_scale(torch.float32), rel=1e-3)


class Concats(nn.Module):
    """Concatenation of two conv-BN branches (one through an avg-pool producer chain, one with a
    LeakyReLU), a residual stream, ReLU6 modules, functional ops, a reshape and a channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU6())
        self.a = nn.Sequential(nn.Conv2d(8, 4, 1), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.LeakyReLU(0.1))
        self.mix = nn.Conv2d(8, 8, 1)
        self.mix_bn = nn.BatchNorm2d(8, momentum=None, eps=1e-3)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a(x), F.relu(self.b(x))], dim=1)
        n, h, w = y.size(0), y.shape[2], y.shape[3]
        y = y.view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)  # a channel shuffle
        y = self.mix_bn(self.mix(y)) + x * 0.5  # residual stream, scaled by a constant
        y = self.dw_bn(self.dw(F.relu(y)))
        y = F.adaptive_max_pool2d(F.relu(y), 2)
        return self.head(torch.flatten(y, 1))


def test_concatenations_shuffles_and_clamps_keep_the_function():
    g = generator()
    model = trained_looking(Concats(), g).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    # The stem's ReLU6 carries the stream's c: its bounds were divided by it.
    assert type(converted.stem[2]) is nn.Hardtanh and converted.stem[2].max_val < 6.0
    assert_same_function(model, converted, torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64))


def test_a_residual_stream_shares_one_constant():
    g = generator()
    model = trained_looking(M.resnet18(num_classes=10, bn="plain"), g)
    gammas = {n: m.weight.detach().abs().max().item() for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    convert_batchnorm(model)
    # The stem and every layer1 block's second BatchNorm meet at the additions of layer1.
    stream = ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    c = 2.0 * max(gammas[n] for n in stream)
    for name in stream:
        bn = model.get_submodule(name)
        assert bn.importance.max().item() == pytest.approx(gammas[name] / c, rel=1e-5)
    # A block's inner BatchNorm has its own constant: its largest channel sits at 1 / headroom.
    assert model.layer1[0].bn1.importance.max().item() == pytest.approx(0.5, rel=1e-5)


def test_headroom_sets_the_largest_importance():
    model = trained_looking(M.vgg_small(bn="plain"), generator())
    convert_batchnorm(model, headroom=4.0)
    for m in model.modules():
        if isinstance(m, BoundedBatchNorm2d):
            assert m.importance.max().item() == pytest.approx(0.25, rel=1e-5)


def test_bias_false_needs_zero_shifts_and_keeps_the_paper_layer():
    model = trained_looking(M.vgg_small(bn="plain"), generator())
    with pytest.raises(ValueError, match="bias=False would drop the nonzero shift"):
        convert_batchnorm(copy.deepcopy(model), bias=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
    converted = convert_batchnorm(copy.deepcopy(model), bias=False)
    assert all(m.bias is None for m in converted.modules() if isinstance(m, BoundedBatchNorm2d))
    assert_same_function(model, converted, torch.randn(4, 3, 16, 16), rtol=1e-5)


class SiLUNet(nn.Module):
    def __init__(self, act=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.act = act()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("act", [nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid])
def test_non_homogeneous_activation_needs_gamma_below_one(act):
    g = generator()
    model = trained_looking(SiLUNet(act), g, peak=0.99).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    # c = 1: the importance is |gamma| itself.
    torch.testing.assert_close(converted.bn.importance, model.bn.weight.detach().abs().clamp_min(1e-300),
                               atol=1e-30, rtol=1e-12)
    assert_same_function(model, converted, torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64))
    with torch.no_grad():
        model.bn.weight[1] = 1.5
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"'bn': \|gamma\| reaches 1.5 >= 1, .*{act.__name__} 'act'"):
        convert_batchnorm(model)
    assert type(model.bn) is nn.BatchNorm2d  # nothing changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_eval_mode_keeps_eval_outputs_where_exact_is_impossible():
    g = generator()
    model = trained_looking(SiLUNet(), g, peak=3.0).double().eval()
    converted = convert_batchnorm(copy.deepcopy(model), mode="eval")
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(outputs(converted, x, False), outputs(model, x, False), rtol=1e-10, atol=1e-10)
    assert converted.bn.importance.max().item() == pytest.approx(0.5, rel=1e-9)  # headroom 2
    # Documented: in training mode that layer normalises with batch statistics and is smaller.
    assert not torch.allclose(outputs(converted, x, True), outputs(model, x, True))


def test_eval_mode_refuses_when_the_running_variance_cannot_carry_the_scale():
    model = trained_looking(SiLUNet(), generator(), peak=3.0)
    with torch.no_grad():
        model.bn.running_var[2] = 0.0  # sqrt(var + eps) cannot shrink below sqrt(eps)
    with pytest.raises(ValueError, match="running variance is too small"):
        convert_batchnorm(model, mode="eval")


class AfterConcat(nn.Module):
    """A BatchNorm over a concatenation (DenseNet's layout): no convolution of its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.conv(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


class SharedProducer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(self.bn(y)) + y


@pytest.mark.parametrize("cls,reason", [
    (AfterConcat, r"its input comes from cat 'cat', not from a convolution"),
    (SharedProducer, r"its input \(Conv2d 'conv'\) is also read by 'add'"),
])
def test_negative_gammas_without_a_convolution_of_their_own_are_refused(cls, reason):
    model = trained_looking(cls(), generator(), peak=0.9)
    with torch.no_grad():
        model.bn.weight[1] = -0.5
    with pytest.raises(ValueError, match=r"'bn': \d+ negative gamma\(s\) .*" + reason):
        convert_batchnorm(model)
    assert type(model.bn) is nn.BatchNorm2d
    with torch.no_grad():
        model.bn.weight.abs_()
    converted = convert_batchnorm(copy.deepcopy(model))  # positive gammas convert exactly
    assert_same_function(model, converted, torch.randn(4, 3, 4, 4), rtol=1e-5)


def test_a_batchnorm_reached_by_a_scaled_stream_absorbs_it():
    """AfterConcat's inputs carry no c, so scale them: a BatchNorm after a stem feeds the concatenation."""
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.stem_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.grow = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(8, eps=1e-2)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = F.relu(self.stem_bn(self.stem(x)))
            x = torch.cat([x, self.grow(x)], 1)
            return self.head(F.relu(self.bn(x)))

    g = generator()
    model = trained_looking(Dense(), g, signed=False).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    c = 2.0 * model.stem_bn.weight.abs().max().item()
    assert converted.bn.eps == pytest.approx(1e-2 / c**2)
    assert_same_function(model, converted, torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64))


def test_untraceable_model_converts_without_a_graph_when_gammas_allow():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y.relu() if y.sum() > 0 else y.tanh()  # data-dependent: fx cannot trace it

    g = generator()
    model = trained_looking(Branchy(), g, peak=0.9, signed=False).double()
    converted = convert_batchnorm(copy.deepcopy(model))
    assert_same_function(model, converted, torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64))
    with torch.no_grad():
        model.bn.weight[1] = 1.2
    with pytest.raises(ValueError, match=r"'bn': \|gamma\| reaches 1.2 >= 1, and torch.fx could not trace"):
        convert_batchnorm(model)


def test_tied_and_hooked_layers_are_not_rescaled():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.out = nn.Conv2d(4, 4, 1)
            self.again = nn.Conv2d(4, 4, 1)
            self.again.weight = self.out.weight  # tied: rescaling one would rescale both

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)))
            return self.out(y) + self.again(x[:, :1].expand(-1, 4, -1, -1))

    model = trained_looking(Tied(), generator(), peak=1.5, signed=False)
    with pytest.raises(ValueError, match=r"Conv2d 'out'"):
        convert_batchnorm(copy.deepcopy(model))
    hooked = trained_looking(SiLUNet(nn.ReLU), generator(), peak=1.5, signed=False)
    hooked.fc.register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match=r"Linear 'fc'"):
        convert_batchnorm(hooked)


def test_affine_false_and_no_running_stats_layers():
    g = generator()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, track_running_stats=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    ).double()
    trained_looking(model, g)
    converted = convert_batchnorm(copy.deepcopy(model))
    assert converted[1].weight is None and converted[4].running_mean is None
    assert_same_function(model, converted, torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64))


def test_a_shared_batchnorm_and_a_reused_convolution():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            for _ in range(2):  # one conv and one BatchNorm called twice
                x = F.relu(self.bn(self.conv(x)))
            return self.fc(x.mean((2, 3)))

    g = generator()
    model = trained_looking(Reuse(), g, signed=False, peak=0.9).double()  # c = 1: the conv also reads x
    converted = convert_batchnorm(copy.deepcopy(model))
    assert_same_function(model, converted, torch.randn(4, 4, 5, 5, generator=g, dtype=torch.float64))
