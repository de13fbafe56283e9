"""Stochastic depth / drop path before a residual sum: channel-wise elementwise, so it passes.

torchvision's ``StochasticDepth`` and ``stochastic_depth``, timm's ``DropPath`` and ``drop_path``
multiply each *sample* by 0 or ``1/(1-p)`` in training and are the identity in eval mode: they
never mix channels. A residual stream through one couples with ``residual_streams=True``, in
training mode as in eval mode (the same graph), and by default the stream is blocked by its
residual addition only, not by the drop. Exactness as in test_residual_streams.py: the pruned
network equals the original with the removed channels masked, here also in training mode with
the same random drops. Skipped with a reason when torchvision or timm is not installed.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo_models
from pruning_helpers import zero_removed
from rnip_ext.pruning import apply, channel_graph, count_flops, count_params, plan
from rnip_ext.pruning.graph import is_drop_path

tvm = zoo_models.torchvision_models()  # also puts the stub torchvision needs in place
timm = zoo_models.timm_module()
if tvm is not None:
    from torchvision.ops import StochasticDepth, stochastic_depth
if timm is not None:
    from timm.layers import DropPath, drop_path

P = 0.5  # drop probability of the small networks: about half the samples dropped in training

# (drop kind, library it needs)
KINDS = [("StochasticDepth", "torchvision"), ("stochastic_depth", "torchvision"),
         ("DropPath", "timm"), ("drop_path", "timm")]
PARAMS = [pytest.param(kind, lib, id=kind) for kind, lib in KINDS]


def need(lib: str) -> None:
    if (tvm if lib == "torchvision" else timm) is None:
        pytest.skip(reason=f"{lib} is not installed (optional test dependency)")


class DropBlock(nn.Module):
    """relu(x + drop(BN(conv(relu(BN(conv(x))))))): the residual branch through a per-sample drop,
    a module or one of the functions called by its global name (as a model's own code would)."""

    def __init__(self, c: int, kind: str, k: int = 1):
        super().__init__()
        self.kind = kind
        self.conv1, self.bn1 = nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)
        self.drop = {"StochasticDepth": lambda: StochasticDepth(P, "row"),
                     "DropPath": lambda: DropPath(P)}.get(kind, nn.Identity)()

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.kind == "stochastic_depth":
            out = stochastic_depth(out, P, "row", self.training)
        elif self.kind == "drop_path":
            out = drop_path(out, P, self.training)
        else:
            out = self.drop(out)
        return F.relu(x + out)


class DropNet(nn.Module):
    """Stem conv-BN-ReLU, two drop blocks on one stream, average pool, linear head."""

    def __init__(self, kind: str, k: int = 1):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, k, padding=k // 2, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(DropBlock(8, kind, k), DropBlock(8, kind, k))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def prepared(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """Scales U(0.05, 1), shifts U(-0.1, 0.1), running statistics of one batch, eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.uniform_(0.05, 1.0)
            m.bias.uniform_(-0.1, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(torch.randn(4, *shape[1:]))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


def canonical(groups):
    """Groups as comparable values (graph nodes by name: each trace has its own node objects)."""
    return [(g.name, g.bns, g.producers, g.channels, g.depthwise, g.gates,
             [(c.name, c.kind, c.block, c.source, [n.name for n in c.path]) for c in g.consumers],
             [n.name for n in g.stream]) for g in groups]


def close(got, want):
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kind,lib", PARAMS)
def test_the_stream_couples_through_the_drop_in_training_and_eval(kind, lib):
    need(lib)
    x = torch.randn(1, 3, 8, 8)
    model = DropNet(kind)
    seen = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        default = channel_graph(model, x)
        # Blocked by the residual additions only: the drop is not what stops the stream.
        assert {b.bn for b in default.blockers} == {"stem_bn", "blocks.0.bn2", "blocks.1.bn2"}
        assert {b.construct for b in default.blockers} == {"residual addition"}
        assert [g.name for g in default.groups] == ["blocks.0.bn1", "blocks.1.bn1"]
        streams = channel_graph(model, x, residual_streams=True)
        assert not streams.blockers
        (stream,) = [g for g in streams.groups if g.residual]
        assert stream.bns == ["stem_bn", "blocks.0.bn2", "blocks.1.bn2"] and len(stream.additions) == 2
        assert {c.name for c in stream.consumers} == {"blocks.0.conv1", "blocks.1.conv1", "head"}
        # The walk passed both drops, recognised as drops (a module leaf or a wrapped call).
        modules = dict(model.named_modules())
        assert sum(is_drop_path(n, modules) for n in stream.stream) == 2, stream.stream
        seen[mode] = canonical(streams.groups)
    # The drop is a leaf (or a wrapped call): the graph does not depend on the mode.
    assert seen["train"] == seen["eval"]


@pytest.mark.parametrize("kind,lib", PARAMS)
def test_pruned_equals_masked_in_eval_and_with_the_same_drops_in_training(kind, lib):
    need(lib)
    x = torch.randn(8, 3, 8, 8)
    model = prepared(DropNet(kind, k=3), x.shape)
    p = plan(model, 0.4, example_inputs=x[:1], residual_streams=True)
    assert "stem_bn" in p.keep and torch.equal(p.keep["stem_bn"], p.keep["blocks.1.bn2"])
    zero_removed(model, p.keep, scales=False)  # removed channels output 0: nothing to fold
    p = plan(model, 0.4, example_inputs=x[:1], residual_streams=True)
    pruned, masked = apply(model, p), zero_removed(copy.deepcopy(model), p.keep)
    with torch.no_grad():
        close(pruned(x), masked(x))
        evaluated = masked(x)
        pruned.train(), masked.train()
        torch.manual_seed(1)
        got = pruned(x)
        torch.manual_seed(1)
        want = masked(x)
    close(got, want)
    # The drops were active (some samples' branches dropped, the others scaled by 1/(1-p)).
    assert not torch.allclose(want, evaluated, atol=1e-3)
    assert p.flops == (count_flops(model, x[:1]), count_flops(pruned, x[:1]))
    assert p.params == (count_params(model), count_params(pruned))


@pytest.mark.parametrize("kind,lib", PARAMS)
def test_shift_constants_fold_exactly_through_the_drop_in_eval(kind, lib):
    """Shifts kept, 1x1 convs: a removed channel's constant passes the drop unchanged (eval mode)
    and is summed into the stream; the fold is exact."""
    need(lib)
    x = torch.randn(4, 3, 6, 6)
    model = prepared(DropNet(kind, k=1), x.shape)
    p = plan(model, 0.4, example_inputs=x[:1], residual_streams=True)
    assert "stem_bn" in p.keep and p.inexact_folds == []
    pruned, masked = apply(model, p), zero_removed(copy.deepcopy(model), p.keep, shifts=False)
    with torch.no_grad():
        close(pruned(x), masked(x))


# The zoo's EfficientNet-B0 with its drops on: torchvision's default stochastic_depth_prob=0.2,
# timm's drop_path_rate=0.2. Before, the drops blocked every stream (torchvision's as the call
# "stochastic_depth", timm's in training as the product with its random mask).
def _efficientnet(lib: str) -> nn.Module:
    torch.manual_seed(0)
    if lib == "torchvision":
        model = tvm.efficientnet_b0(weights=None)
        assert any(isinstance(m, StochasticDepth) and m.p > 0 for m in model.modules())
    else:
        model = timm.create_model("efficientnet_b0", pretrained=False, drop_path_rate=0.2)
        assert any(isinstance(m, DropPath) and m.drop_prob > 0 for m in model.modules())
    return model


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_efficientnet_b0_streams_couple_and_prune_exactly(lib):
    need(lib)
    x = torch.randn(1, 3, 64, 64)
    model = prepared(_efficientnet(lib), x.shape)
    model.train()
    trained = channel_graph(model, x, residual_streams=True)
    assert {b.construct for b in channel_graph(model, x).blockers} == {"residual addition"}
    model.eval()
    assert {b.construct for b in channel_graph(model, x).blockers} == {"residual addition"}
    graph = channel_graph(model, x, residual_streams=True)
    assert canonical(graph.groups) == canonical(trained.groups)
    streams = [g for g in graph.groups if g.residual]
    assert len(streams) == 5 and not graph.blockers  # one per stage with repeated blocks

    p = plan(model, target_flops=0.5, example_inputs=x, residual_streams=True)
    assert p.achieved_flops <= 0.5
    zero_removed(model, p.keep, scales=False)
    p = plan(model, target_flops=0.5, example_inputs=x, residual_streams=True)
    assert any(g.residual and len(p.keep.get(g.name, ())) < g.channels for g in p.groups)
    pruned, masked = apply(model, p), zero_removed(copy.deepcopy(model), p.keep)
    x2 = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = pruned(x2), masked(x2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert p.flops == (count_flops(model, x), count_flops(pruned, x))
    assert p.params == (count_params(model), count_params(pruned))
