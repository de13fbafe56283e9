"""rnip_ext.budget: one training run to a FLOPs budget (the regulariser, controller and schedule in fit)."""

import dataclasses
import json

import pytest
import torch

from rnip_ext import BoundedBatchNorm2d
from rnip_ext import models as M
from rnip_ext import pruning
from rnip_ext.budget import BudgetPruning, check_budget, train_to_budget
from rnip_ext.data import load_dataset
from rnip_ext.rundir import load_checkpoint

X0 = torch.zeros(1, 1, 16, 16)


def _digits():
    """The digits with a 384-image training set (CI speed); validation and test as shipped."""
    splits = load_dataset("digits", seed=0, image_size=16)
    return dataclasses.replace(splits, train=splits.train.subset(torch.arange(384)))


def _model(seed=0):
    torch.manual_seed(seed)
    return M.vgg_small(10, "bounded", widths=(8, 8, 16), in_channels=1)


def _run(out, epochs=4, **kw):
    model = _model()
    return model, train_to_budget(model, _digits(), out, target_flops=0.25, epochs=epochs, example_inputs=X0,
                                  strength=5e-2, shift=1.0, lr=0.05, batch_size=64, progress=False, **kw)


def test_a_short_budget_run_ends_within_budget_and_its_checkpoints_hold_the_architecture(tmp_path):
    original = pruning.count_flops(_model(), X0)
    _, result = _run(tmp_path / "run")
    final = result["model"]
    assert result["flops"] == pruning.count_flops(final, X0) <= 0.25 * original
    assert result["original_flops"] == original and result["flops_fraction"] <= 0.25
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("params", "flops", "flops_fraction", "channels", "strength", "next_strength",
                "active_flops_fraction", "flops_schedule", "removed", "focused", "wall_seconds", "val_accuracy"):
        assert all(key in r for r in rows), key
    # The schedule ends at epoch 1 (budget_at 1/3 of 4, rounded); the exact cut comes after the
    # settling epochs, capped at the last-but-one epoch (3); the strength moved under the controller.
    assert all(r["flops_fraction"] <= 0.25 for r in rows[2:])
    assert rows[0]["strength"] == pytest.approx(5e-2) and rows[0]["next_strength"] != rows[0]["strength"]
    assert rows[-1]["flops"] == result["flops"]
    assert rows[-1]["channels"] == {n: m.num_features for n, m in final.named_modules()
                                    if isinstance(m, BoundedBatchNorm2d)}
    # last.pt: the final architecture, restorable into a fresh (unpruned) builder model.
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    restored = pruning.restore(_model(seed=3), last["model"], last["architecture"])
    assert pruning.count_flops(restored, X0) == result["flops"]
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), final.eval()(x), rtol=0, atol=0)
    # best.pt is an epoch within the budget (model selection only among those).
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert result["epoch"] >= 1
    assert pruning.count_flops(pruning.restore(_model(), best["model"], best["architecture"]), X0) <= 0.25 * original


def test_resume_of_an_interrupted_budget_run_continues_it(tmp_path, monkeypatch):
    from rnip_ext import training

    _, full = _run(tmp_path / "full")
    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut")
    monkeypatch.setattr(training, "train_epoch", real)
    model, resumed = _run(tmp_path / "cut", resume_from=load_checkpoint(str(tmp_path / "cut" / "last.pt")))
    assert resumed["original_flops"] == full["original_flops"]
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["architecture"] == b["architecture"]
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key  # bitwise on CPU
    assert a["callback"] == b["callback"] and a["strength"] == b["strength"]
    # The regulariser's focus travels in last.pt too (the resumed epochs penalised the same channels).
    assert a["regularizer"]["focus"] is not None and a["regularizer"] == b["regularizer"]
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if k not in ("wall_seconds", "time", "images_per_second")}  # noqa: E731
                      for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert rows("cut") == rows("full")


@pytest.mark.parametrize("kwargs, match", [
    ({"target_flops": 0}, "target_flops must be a fraction"),
    ({"target_flops": 1.5}, "target_flops must be a fraction"),
    ({"target_flops": 0.5, "threshold": 1.0}, "threshold must be a number in"),
    ({"target_flops": 0.5, "threshold": 0}, "threshold must be a number in"),
    ({"target_flops": 0.001, "min_channels": 4}, "cannot be met"),
])
def test_bad_budgets_are_refused_before_anything_is_written(tmp_path, kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        check_budget(model, example_inputs=X0, **kwargs)
    with pytest.raises(ValueError, match=match):
        train_to_budget(model, _digits(), tmp_path / "run", epochs=2, example_inputs=X0, progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_callback_arguments():
    with pytest.raises(ValueError, match="prune_every"):
        BudgetPruning(X0, 0.5, 4, prune_every=0)
    with pytest.raises(ValueError, match="epochs must be an int >= 2"):
        BudgetPruning(X0, 0.5, 1)
    assert BudgetPruning(X0, 0.5, 2, budget_at=1.0).by_epoch == 1
    with pytest.raises(ValueError, match="budget_at"):
        BudgetPruning(X0, 0.5, 4, budget_at=0)
    cb = BudgetPruning(X0, 0.5, 10, prune_every=3)
    assert cb.by_epoch == 3 and cb.cut_epoch == 5 and BudgetPruning(X0, 0.5, 4).cut_epoch == 3
    assert BudgetPruning(X0, 0.5, 10, settle=0).cut_epoch == 3
    assert [cb.schedule.due(e) for e in range(6)] == [False, False, True, False, False, True]
    # Focused (default): geometric schedule after the warm-up, no brake; unfocused: the controller's defaults.
    c = BudgetPruning(X0, 0.04, 30).controller
    assert (c.curve, c.start_epoch, c.by_epoch, c.max_drop, c.max_increase, c.max_decrease) == ("geometric", 2, 10, 1.0, 2.0, 0.5)
    assert c.target_at(2) == 1.0 and c.target_at(6) == pytest.approx(0.2) and c.target_at(10) == pytest.approx(0.04)
    assert BudgetPruning(X0, 0.04, 3).controller.start_epoch == 0  # the warm-up never reaches the budget epoch
    c = BudgetPruning(X0, 0.04, 30, focus=False).controller
    assert (c.curve, c.start_epoch, c.max_drop) == ("linear", 0, 0.1)
    for kwargs, match in (({"scope": "layer"}, "scope must be one of"), ({"warmup": -1}, "warmup must be an int"),
                          ({"settle": 1.5}, "settle must be an int")):
        with pytest.raises(ValueError, match=match):
            BudgetPruning(X0, 0.5, 4, **kwargs)
    with pytest.raises(TypeError, match="callback must be a BudgetPruning"):
        train_to_budget(_model(), _digits(), "unused", target_flops=0.5, epochs=2, example_inputs=X0,
                        callback=lambda state: None)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_focus_is_what_the_planner_would_remove_next(scope):
    from rnip_ext import RecedingRegularizer

    model = _model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features))
    reg = RecedingRegularizer(model, 1.0, 1.0)
    cb = BudgetPruning(X0, 0.2, 9, scope=scope, warmup=0)
    cb.prepare(model, reg)
    target = cb.controller.target_at(1)
    assert 0.2 < target < 1.0
    original = pruning.count_flops(model, X0)
    p = pruning.plan(model, target_flops=target, scope=scope, example_inputs=X0)
    focused = reg.focused
    for name, m in model.named_modules():
        if isinstance(m, BoundedBatchNorm2d):
            kept = torch.zeros(m.num_features, dtype=torch.bool)
            kept[p.keep.get(name, torch.arange(m.num_features))] = True
            assert torch.equal(focused[name], ~kept), name
    # Removing the focused channels meets the target; putting any one back would not (shortest prefix).
    assert p.flops[1] <= target * original
    # Once the model meets the target, nothing is focused.
    small = pruning.apply(model, pruning.plan(model, target_flops=0.2, example_inputs=X0))
    cb2 = BudgetPruning(X0, 0.2, 9, scope=scope, warmup=0)
    cb2.schedule.original_flops = original
    reg.rebind(small)
    assert cb2.focus_regularizer(small, reg, 0) == 0 and not any(m.any() for m in reg.focused.values())
    # focus=False leaves the regulariser as it was.
    reg.focus(None)
    assert BudgetPruning(X0, 0.2, 9, focus=False).focus_regularizer(small, reg, 0) == -1 and reg.focused is None
