"""rnip_ext.app.runs: the steps `rnip train`, `rnip prune` and `rnip demo` share."""

import copy

import pytest
import torch
from torch import nn

from rnip_ext import pruning
from rnip_ext.data.dataset import DataSplits, InMemoryDataset
from rnip_ext.nn import BoundedBatchNorm2d
from rnip_ext.app.runs import budget_summary, build_model, image_size_for, prune_and_measure, prune_summary
from rnip_ext.training import evaluate

from pruning_helpers import warmed_up


def _splits(n=48, classes=4, size=16):
    g = torch.Generator().manual_seed(int(torch.randint(2**31, ())))

    def part(k):
        images = torch.randint(0, 256, (k, 1, size, size), dtype=torch.uint8, generator=g)
        return InMemoryDataset(images, torch.randint(0, classes, (k,), generator=g), (0.5,), (0.25,))

    return DataSplits(part(n), part(n // 2), part(n // 2), classes, 1, size)


def _model(method="rni", classes=4):
    return warmed_up(build_model({"arch": "vgg_small", "method": method}, classes, 1), (1, 1, 16, 16))


def test_build_model_follows_the_config():
    rni, l1 = _model("rni"), _model("l1")
    assert any(isinstance(m, BoundedBatchNorm2d) for m in rni.modules())
    assert not any(isinstance(m, BoundedBatchNorm2d) for m in l1.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in l1.modules())
    assert rni(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model({"arch": "vgg11", "method": "rni"}, 4, 1)
    with pytest.raises(ValueError, match="method must be one of"):
        build_model({"arch": "vgg_small", "method": "slimming"}, 4, 1)
    assert image_size_for("vgg_small", "digits") == 16 and image_size_for("vgg16", "digits") == 32
    assert image_size_for("vgg16", "cifar10") is None


@pytest.mark.parametrize("method, scope", [("rni", "global"), ("none", "local")])
def test_prune_and_measure_meets_the_budget_and_leaves_the_model(method, scope):
    splits, model = _splits(), _model(method)
    x = torch.zeros(1, 1, 16, 16)
    state = copy.deepcopy(model.state_dict())
    out = prune_and_measure(model, splits, x, target_flops=0.3, scope=scope, speed_batch_size=8)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # model untouched
    full = pruning.count_flops(model, x)
    assert out.plan.flops == (full, pruning.count_flops(out.small, x)) and out.plan.flops[1] <= 0.3 * full
    assert out.acc_before == evaluate(model, splits.test) and out.acc_pruned == evaluate(out.small, splits.test)
    assert out.val_pruned == evaluate(out.small, splits.val)
    assert out.speed_before.batch_size == 8 and out.speed_after.images_per_s > 0
    best = {"test_accuracy": 0.5, "val_accuracy": 0.25, "epoch": 3}
    summary = prune_summary(out, best, config={"arch": "vgg_small", "dataset": "digits", "method": method},
                            ratio=None, scope=scope, target_flops=0.3)
    assert summary["ratio"] == out.plan.achieved_ratio and summary["scope"] == scope
    assert (summary["flops_before"], summary["flops"]) == out.plan.flops
    assert summary["params"] == pruning.count_params(out.small)
    assert summary["accuracy_after_pruning"] == out.acc_pruned and summary["test_accuracy"] == 0.5
    widths = {n: m.num_features for n, m in out.small.named_modules()
              if isinstance(m, (nn.BatchNorm2d, BoundedBatchNorm2d))}
    assert {name: kept for name, _, kept in summary["kept_channels"]} == widths


def test_prune_and_measure_refuses_an_unreachable_budget():
    with pytest.raises(ValueError):
        prune_and_measure(_model(), _splits(), torch.zeros(1, 1, 16, 16), target_flops=1e-5)


def test_budget_summary_counts_the_narrowed_network():
    model = _model()
    x = torch.zeros(1, 1, 16, 16)
    keep = {g.name: torch.arange(g.channels // 2) for g in pruning.find_channel_groups(model, x)}
    small = pruning.apply(model, pruning.plan_from_keep(model, keep, example_inputs=x))
    s = budget_summary(model, small, x, 0.3)
    assert s["flops"] == pruning.count_flops(small, x) and s["flops_before"] == pruning.count_flops(model, x)
    assert s["achieved_flops"] == s["flops"] / s["flops_before"] and s["params"] == pruning.count_params(small)
    total = sum(m.num_features for m in model.modules() if isinstance(m, BoundedBatchNorm2d))
    assert s["ratio"] == pytest.approx(1 - sum(c // 2 for _, c, _ in s["kept_channels"]) / total)
    assert all(kept == before // 2 for _, before, kept in s["kept_channels"])


def test_resolve_threads_uses_the_idle_cpus_or_what_it_is_told(monkeypatch):
    import os

    from rnip_ext.app.runs import resolve_threads

    assert resolve_threads(3) == 3
    for bad in (0, -1, 1.5, True, "two"):
        with pytest.raises(ValueError, match="threads must be an int >= 1 or 'auto'"):
            resolve_threads(bad)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.8, 1.0, 1.0))  # another job holds a core
    assert resolve_threads("auto") == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))  # idle
    assert resolve_threads("auto") == 2 and resolve_threads(None) == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # very busy: still one
    assert resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's choice per rank is kept
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert resolve_threads("auto") == 1
