"""Pruning BoundedBatchNorm2d models through Torch-Pruning's dependency graph."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is optional: pip install rnip_ext[torch-pruning]")

from pruning_helpers import assert_same_function, masked_copy, warmed_up  # noqa: E402
from rnip_ext import BoundedBatchNorm2d  # noqa: E402
from rnip_ext import models as M  # noqa: E402
from rnip_ext.integrations import torch_pruning as rtp  # noqa: E402
from rnip_ext.pruning import count_flops, count_params  # noqa: E402

# MetaPruner up to Torch-Pruning 1.5.1, BasePruner (with MetaPruner an alias) since.
BasePruner = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner


def resnet18_coupling(name: str) -> str:
    """ResNet-18's BatchNorms that Torch-Pruning must prune together: those summed into one
    residual stream (the stem joins layer1's, a downsample joins its stage's)."""
    match = re.fullmatch(r"layer(\d)\.\d\.(bn2|downsample\.1)", name)
    if match:
        return f"stream{match.group(1)}"
    return "stream1" if name == "bn1" else name


# (name, builder, input shape, coupling: BatchNorm name -> name of its coupled set)
MODELS = [
    ("vgg_small", lambda: M.vgg_small(widths=(8, 12, 16, 16, 24)), (2, 3, 32, 32), lambda name: name),
    ("resnet18", lambda: M.resnet18(num_classes=10), (2, 3, 32, 32), resnet18_coupling),
]


def bounded_bns(model: nn.Module) -> dict[str, BoundedBatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BoundedBatchNorm2d)}


def distinct_logits_(model: nn.Module, coupling) -> None:
    """Logits all distinct across coupled sets and equal within one, so that every group score
    (max, min or mean over a set) is the same ``sigmoid(logit)`` and the ranking has no ties."""
    sets: dict[str, list[BoundedBatchNorm2d]] = {}
    for name, bn in bounded_bns(model).items():
        sets.setdefault(coupling(name), []).append(bn)
    total = sum(bns[0].num_features for bns in sets.values())
    values = torch.linspace(-4.0, 4.0, total)[torch.randperm(total)]
    start = 0
    with torch.no_grad():
        for bns in sets.values():
            width = bns[0].num_features
            for bn in bns:
                bn.weight.copy_(values[start : start + width])
            start += width


def kept_channels(original: nn.Module, pruned: nn.Module) -> dict[str, torch.Tensor]:
    """Per BoundedBatchNorm2d, the original channels still there (found by their logits, distinct
    within a layer)."""
    before = bounded_bns(original)
    keep = {}
    for name, bn in bounded_bns(pruned).items():
        pairs = (bn.weight.detach()[:, None] == before[name].weight.detach()[None, :]).nonzero()
        assert torch.equal(pairs[:, 0], torch.arange(bn.num_features)), f"{name}: logits not a subset"
        keep[name] = pairs[:, 1]
    return keep


def assert_consistent(model: nn.Module) -> None:
    for name, bn in bounded_bns(model).items():
        c = bn.num_features
        assert bn.weight.shape == (c,) and bn.running_mean.shape == (c,) and bn.running_var.shape == (c,), name
        assert bn.bias is None or bn.bias.shape == (c,), name


def prune_with_torch_pruning(build, shape, coupling, ratio=0.5):
    model = warmed_up(build(), shape)
    distinct_logits_(model, coupling)
    original = copy.deepcopy(model)
    x = torch.randn(*shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rtp.pruner(model, x, ratio).step()
    # With our pruner registered, no bounded BatchNorm logit is a bare "unwrapped" parameter.
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    return original, model, x


@pytest.mark.parametrize("name,build,shape,coupling", MODELS, ids=[m[0] for m in MODELS])
def test_pruned_model_runs_is_smaller_and_consistent(name, build, shape, coupling):
    original, pruned, x = prune_with_torch_pruning(build, shape, coupling)
    assert_consistent(pruned)
    assert count_params(pruned) < count_params(original)
    assert count_flops(pruned, x) < count_flops(original, x)
    assert sum(bn.num_features for bn in bounded_bns(pruned).values()) < sum(
        bn.num_features for bn in bounded_bns(original).values()
    )
    # The classifier keeps its classes; the network still trains.
    assert pruned(x).shape == original(x).shape == (shape[0], 10)
    pruned.train()
    pruned(x).sum().backward()
    assert all(bn.weight.grad.shape == bn.weight.shape for bn in bounded_bns(pruned).values())


@pytest.mark.parametrize("name,build,shape,coupling", MODELS, ids=[m[0] for m in MODELS])
def test_kept_channels_are_the_most_important_globally(name, build, shape, coupling):
    original, pruned, _ = prune_with_torch_pruning(build, shape, coupling)
    keep = kept_channels(original, pruned)
    # Coupled BatchNorms lose the same channels.
    by_set: dict[str, torch.Tensor] = {}
    for bn_name, kept in keep.items():
        key = coupling(bn_name)
        assert key not in by_set or torch.equal(by_set[key], kept), bn_name
        by_set[key] = kept
    # One score per channel of each coupled set: kept ones all beat removed ones, and the count
    # is Torch-Pruning's global one, int(total * (1 - ratio)).
    before = bounded_bns(original)
    kept_scores, removed_scores = [], []
    for bn_name, kept in keep.items():
        if bn_name != min(n for n in keep if coupling(n) == coupling(bn_name)):
            continue
        scores = before[bn_name].importance
        mask = torch.zeros(len(scores), dtype=torch.bool)
        mask[kept] = True
        kept_scores.append(scores[mask])
        removed_scores.append(scores[~mask])
    kept_scores, removed_scores = torch.cat(kept_scores), torch.cat(removed_scores)
    assert len(removed_scores) > 0
    assert kept_scores.min() > removed_scores.max()
    assert len(kept_scores) == int((len(kept_scores) + len(removed_scores)) * 0.5)


@pytest.mark.parametrize("name,build,shape,coupling", MODELS, ids=[m[0] for m in MODELS])
def test_pruned_equals_original_with_removed_channels_silenced(name, build, shape, coupling):
    original, pruned, x = prune_with_torch_pruning(build, shape, coupling)
    pruned.eval()
    assert all(bn.bias is None for bn in bounded_bns(original).values())
    keep = kept_channels(original, pruned)
    assert any(len(k) < bounded_bns(original)[n].num_features for n, k in keep.items())
    assert_same_function(pruned, masked_copy(original, keep), x)


# ------------------------------------------------------------------------------------------------
# What Torch-Pruning does to BoundedBatchNorm2d without our pieces


def small_vgg():
    return M.vgg_small(widths=(8, 8, 16))


def test_without_our_pruner_torch_pruning_slices_the_weight_alone_and_breaks_the_model():
    model = small_vgg()
    x = torch.randn(2, 3, 16, 16)
    # BoundedBatchNorm2d is not a _BatchNorm: its logit is a bare "unwrapped" parameter to it.
    with pytest.warns(UserWarning, match="Unwrapped parameters detected"):
        p = BasePruner(
            model, x, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
            ignored_layers=[model.classifier],
        )
    p.step()
    bn = model.features[1]
    assert bn.weight.shape[0] < bn.num_features == bn.running_mean.shape[0] == 8
    with pytest.raises(ValueError, match="expected input with 8 channels"):
        model(x)


def test_without_our_pruner_bias_is_sliced_but_statistics_are_not():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BoundedBatchNorm2d(8, bias=True), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.warns(UserWarning, match="Unwrapped parameters detected"):
        p = BasePruner(
            model, torch.randn(1, 3, 8, 8), importance=tp.importance.MagnitudeImportance(),
            pruning_ratio=0.5, ignored_layers=[model[3]],
        )
    p.step()
    bn = model[1]
    assert bn.weight.shape == bn.bias.shape == (4,) and bn.running_var.shape == (8,) and bn.num_features == 8


def test_bn_scale_importance_sees_no_batchnorm_and_prunes_nothing():
    model = small_vgg()
    before = count_params(model)
    p = BasePruner(
        model, torch.randn(1, 3, 16, 16), importance=tp.importance.BNScaleImportance(), pruning_ratio=0.5,
        ignored_layers=[model.classifier], customized_pruners=rtp.customized_pruners(), global_pruning=True,
    )
    p.step()
    assert count_params(model) == before


def test_our_importance_refuses_a_graph_without_our_pruner():
    model = small_vgg()
    with pytest.warns(UserWarning, match="Unwrapped parameters detected"):
        p = BasePruner(
            model, torch.randn(1, 3, 16, 16), importance=rtp.BoundedScaleImportance(), pruning_ratio=0.5,
            ignored_layers=[model.classifier],
        )
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="customized_pruners"):
        p.step()
    for k, v in model.state_dict().items():  # refused before anything was cut
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------------
# The pruning function


LAYOUTS = [(a, b, t) for a in (True, False) for b in (False, True) for t in (True, False) if a or not b]


@pytest.mark.parametrize("affine,bias,track", LAYOUTS)
def test_pruning_function_slices_every_tensor(affine, bias, track):
    bn = BoundedBatchNorm2d(7, affine=affine, track_running_stats=track, bias=bias)
    with torch.no_grad():
        if affine:
            bn.weight.normal_()
            if bias:
                bn.bias.normal_()
        if track:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(5)
    grad = None
    if affine and bias:  # a frozen logit stays frozen
        bn.weight.requires_grad_(False)
    elif affine:  # an accumulated gradient is sliced with the logit
        bn.eval()
        x = torch.randn(2, 7, 3, 3)
        (bn(x) * torch.randn_like(x)).sum().backward()
        grad = bn.weight.grad.clone()
    reference = copy.deepcopy(bn)
    # Torch-Pruning's dependencies call the function itself, with indices in any order.
    pruned = rtp.BoundedBatchNormPruner().prune_out_channels(bn, [5, 0, 3])
    keep = torch.tensor([1, 2, 4, 6])
    assert pruned is bn and bn.num_features == 4
    for name in ("weight", "bias", "running_mean", "running_var"):
        old, new = getattr(reference, name), getattr(bn, name)
        assert (old is None) == (new is None), name
        if old is not None:
            torch.testing.assert_close(new, old[keep], rtol=0, atol=0)
    if affine:
        assert isinstance(bn.weight, nn.Parameter) and bn.weight.requires_grad == (not bias)
        if grad is not None:
            torch.testing.assert_close(bn.weight.grad, grad[keep], rtol=0, atol=0)
    if track:
        assert int(bn.num_batches_tracked) == 5
    bn.eval()
    x = torch.randn(2, 7, 3, 3)
    torch.testing.assert_close(bn(x[:, keep]), reference.eval()(x)[:, keep])


def test_pruning_function_in_and_out_are_one_and_channel_counts():
    f = rtp.BoundedBatchNormPruner()
    bn = BoundedBatchNorm2d(5)
    assert f.prune_in_channels == f.prune_out_channels  # Torch-Pruning's intra-layer coupling
    assert f.get_out_channels(bn) == f.get_in_channels(bn) == 5


def test_pruning_function_bad_input():
    f = rtp.BoundedBatchNormPruner()
    with pytest.raises(IndexError, match="out of range"):
        f.prune_out_channels(BoundedBatchNorm2d(4), [1, 4])
    with pytest.raises(IndexError, match="out of range"):
        f.prune_out_channels(BoundedBatchNorm2d(4), [-1])
    with pytest.raises(ValueError, match="all 3 channels"):
        f.prune_out_channels(BoundedBatchNorm2d(3), [0, 1, 2])
    with pytest.raises(TypeError, match="BoundedBatchNorm2d"):
        f.prune_out_channels(nn.BatchNorm2d(3), [0])
    with pytest.raises(AssertionError, match="Mismatched pruner"):  # Torch-Pruning's own check
        f(nn.BatchNorm2d(3), [0])


def test_customized_pruners_cover_subclasses_found_in_the_model():
    class MyBN(BoundedBatchNorm2d):
        pass

    base = rtp.customized_pruners()
    assert list(base) == [BoundedBatchNorm2d] and isinstance(base[BoundedBatchNorm2d], rtp.BoundedBatchNormPruner)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), MyBN(6), nn.ReLU(), nn.Conv2d(6, 2, 3))
    assert set(rtp.customized_pruners(model)) == {BoundedBatchNorm2d, MyBN}
    p = rtp.pruner(model, torch.randn(1, 3, 8, 8), 0.5)
    p.step()
    assert model[1].num_features == model[1].running_mean.shape[0] == model[0].out_channels < 6
    model(torch.randn(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------
# The importance


class TwoBranches(nn.Module):
    """A bounded and a plain BatchNorm summed into one channel, then a linear head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_a = BoundedBatchNorm2d(6)
        self.b = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)))
        return self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))


def two_branch_graph():
    model = TwoBranches()
    with torch.no_grad():
        model.bn_a.weight.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0, 4.0]))
        model.bn_b.weight.copy_(torch.tensor([0.9, -0.1, 0.05, -0.6, 0.2, 0.3]))
    graph = tp.DependencyGraph().build_dependency(
        model, torch.randn(1, 3, 8, 8), customized_pruners=rtp.customized_pruners()
    )
    return model, graph


@pytest.mark.parametrize("reduction", ["max", "min", "mean", "sum", "prod"])
def test_importance_combines_bounded_and_plain_scales(reduction):
    model, graph = two_branch_graph()
    group = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, list(range(6)))
    scores = torch.stack([torch.sigmoid(model.bn_a.weight.detach()), model.bn_b.weight.detach().abs()])
    expected = {
        "max": scores.amax(0), "min": scores.amin(0), "mean": scores.mean(0), "sum": scores.sum(0),
        "prod": scores.prod(0),
    }[reduction]
    got = rtp.BoundedScaleImportance(group_reduction=reduction)(group)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, expected)
    # Rooted elsewhere in the group, or on a subset of the channels: the same scores.
    other = graph.get_pruning_group(model.bn_b, tp.prune_batchnorm_out_channels, list(range(6)))
    torch.testing.assert_close(rtp.BoundedScaleImportance(group_reduction=reduction)(other), expected)
    subset = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [4, 1, 5])
    torch.testing.assert_close(rtp.BoundedScaleImportance(group_reduction=reduction)(subset), expected[[4, 1, 5]])


@pytest.mark.parametrize("normalizer", ["mean", "max", "sum"])
def test_importance_normalizers(normalizer):
    model, graph = two_branch_graph()
    group = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, list(range(6)))
    raw = rtp.BoundedScaleImportance()(group)
    got = rtp.BoundedScaleImportance(normalizer=normalizer)(group)
    torch.testing.assert_close(got, raw / getattr(raw, normalizer)())
    torch.testing.assert_close(rtp.BoundedScaleImportance(normalizer=lambda s: 2 * s)(group), 2 * raw)


def test_importance_of_a_group_without_batchnorm_is_none():
    model, graph = two_branch_graph()
    group = graph.get_pruning_group(model.fc1, tp.prune_linear_out_channels, list(range(5)))
    assert rtp.BoundedScaleImportance()(group) is None


def test_importance_bad_arguments():
    with pytest.raises(ValueError, match="group_reduction"):
        rtp.BoundedScaleImportance(group_reduction="first")
    with pytest.raises(ValueError, match="normalizer"):
        rtp.BoundedScaleImportance(normalizer="lamp")
    assert isinstance(rtp.BoundedScaleImportance(), tp.importance.Importance)


# ------------------------------------------------------------------------------------------------
# The convenience pruner


def test_pruner_defaults_keep_classes_and_training_mode():
    model = M.resnet18(num_classes=10)
    model.train()
    p = rtp.pruner(model, torch.randn(1, 3, 32, 32), 0.5)
    assert isinstance(p, BasePruner) and isinstance(p.importance, rtp.BoundedScaleImportance)
    assert p.global_pruning and model.training  # Torch-Pruning's tracing left it in eval mode
    assert model.fc in p.ignored_layers
    p.step()
    assert model.fc.out_features == 10 and model.fc.in_features < 512


def test_pruner_local_and_user_arguments():
    model = small_vgg()
    ignored = [model.classifier, model.features[0]]
    p = rtp.pruner(model, torch.randn(1, 3, 16, 16), 0.5, global_pruning=False, ignored_layers=ignored)
    p.step()
    assert model.features[0].out_channels == 8  # ignored
    assert model.features[3].out_channels == 4 and model.features[7].out_channels == 8  # half of each
    assert_consistent(model)


def test_groups_without_batchnorm_are_left_alone():
    # fc1's outputs meet no BatchNorm: our importance has no score for them (None), and
    # Torch-Pruning must skip the group (before 1.5.1 it raised TypeError on None in global mode).
    model, _ = two_branch_graph()
    p = rtp.pruner(model, torch.randn(1, 3, 8, 8), 0.5)
    p.step()
    assert model.fc1.out_features == 5 and model.fc2.out_features == 2
    assert model.bn_a.num_features == model.bn_b.num_features == model.fc1.in_features == 3
    model(torch.randn(1, 3, 8, 8))
