"""rnip_ext.budget (the schedule, the strength controller, the budget check) and a budget run in the trainer."""

import dataclasses
import json

import pytest
import torch

from rnip_ext import BoundedBatchNorm2d, BudgetPruner
from rnip_ext import models as M
from rnip_ext import pruning, training
from rnip_ext.budget import BudgetSchedule, RunTooShortError, StrengthController, check_budget
from rnip_ext.callbacks import run_callbacks
from rnip_ext.data import load_dataset
from rnip_ext.rundir import load_checkpoint
from rnip_ext.training import fit, make_optimizer, make_scheduler

X0 = torch.zeros(1, 1, 16, 16)


def test_check_budget_is_the_one_place_a_budget_is_read():
    assert check_budget(target_flops=0.5) == ("flops", 0.5) and check_budget(target_params=1) == ("params", 1.0)
    for kwargs, match in (({}, "exactly one budget"), ({"target_flops": 0.5, "target_params": 0.5}, "exactly one"),
                          ({"target_flops": 0}, r"target_flops must be a fraction in \(0, 1\]"),
                          ({"target_params": True}, "target_params must be a fraction"),
                          ({"target_flops": float("nan")}, "target_flops must be a fraction")):
        with pytest.raises(ValueError, match=match):
            check_budget(**kwargs)


def test_the_schedule_is_no_steeper_than_max_step_removal_in_short_runs():
    s = BudgetSchedule.make(0.2, 10)  # today's one-step cut 100% -> 20%: now over 3 steps
    assert (s.warmup, s.by, s.settle) == (2, 5, 2)
    ratios = [s.target_at(i + 1) / s.target_at(i) for i in range(10)]
    assert min(ratios) >= 0.5 - 1e-12
    assert [s.cut_at(i) for i in (4, 5)] == [None, pytest.approx(0.2 ** (1 / 3))] and s.cut_at(7) == pytest.approx(0.2)
    short = BudgetSchedule.make(0.1, 6)  # 4 steps needed: the warm-up and settling shrink
    assert (short.warmup, short.by, short.settle) == (1, 5, 0)
    with pytest.raises(ValueError, match="too few to reach 0.02 .* 6 steps after 0 warm-up"):
        BudgetSchedule.make(0.02, 6)
    with pytest.raises(ValueError, match="max_step_removal"):
        BudgetSchedule.make(0.5, 10, max_step_removal=1.0)



def test_strength_controller_matches_the_rate_to_what_the_curve_needs():
    s = BudgetSchedule.make(0.25, 8, warmup=0, settle=0, budget_at=0.5)  # by 4: 1, .707, .5, .354, .25
    c = StrengthController(s, max_increase=2.0, max_decrease=0.5, eps=1e-3)
    assert c.update(0, 1.0, 1.0) == pytest.approx(2.0)  # nothing receded, 0.29 needed: as fast as allowed
    # 0.2 receded, 0.8 - 0.5 = 0.3 still needed by step 2: factor 0.301 / 0.201.
    assert c.update(1, 0.8, 1.0) == pytest.approx(0.301 / 0.201)
    assert c.update(2, 0.3, 1.0) == pytest.approx(0.5)  # ahead of the curve
    assert [r.step for r in c.history] == [0, 1, 2]
    with pytest.raises(ValueError, match="max_strength"):
        StrengthController(s, min_strength=1.0, max_strength=0.5)


def _digits():
    """The digits with a 384-image training set (CI speed); validation and test as shipped."""
    splits = load_dataset("digits", seed=0, image_size=16)
    return dataclasses.replace(splits, train=splits.train.subset(torch.arange(384)))


def _model(seed=0):
    torch.manual_seed(seed)
    return M.vgg_small(10, "bounded", widths=(8, 8, 16), in_channels=1)


def _run(out, epochs=5, model=None, resume_from=None):
    model = model or _model()
    opt = make_optimizer(model, 0.05)
    pruner = BudgetPruner(model, X0, target_flops=0.25, epochs=epochs, optimizer=opt)
    splits = _digits()
    best = fit(model, splits, epochs=epochs, optimizer=opt, scheduler=make_scheduler(opt, epochs), regularizer=pruner,
               batch_size=64, progress=False, callbacks=run_callbacks(out, splits, budget=pruner),
               resume_from=resume_from)
    return model, pruner, best


def test_a_budget_run_in_the_trainer_ends_within_budget_and_its_checkpoints_hold_the_architecture(tmp_path):
    model, pruner, best = _run(tmp_path / "run")
    original = pruning.count_flops(_model(), X0)
    assert pruning.count_flops(model, X0) <= 0.25 * original and pruner.original_flops == original
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("params", "flops", "flops_fraction", "channels", "strength", "next_strength", "active_flops_fraction",
                "flops_schedule", "removed", "forced", "focused", "wall_seconds", "val_accuracy", "penalty"):
        assert all(key in r for r in rows), key
    assert rows[-1]["flops"] == pruning.count_flops(model, X0)
    assert rows[-1]["channels"] == {n: m.num_features for n, m in model.named_modules()
                                    if isinstance(m, BoundedBatchNorm2d)}
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    restored = pruning.restore(_model(seed=3), last["model"], last["architecture"])
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=0)
    # best.pt: the best validation epoch among those within the budget.
    state = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    chosen = pruning.restore(_model(), state["model"], state["architecture"])
    assert pruning.count_flops(chosen, X0) <= 0.25 * original and best["epoch"] >= pruner.schedule.done


def test_resume_of_an_interrupted_budget_run_continues_it_bitwise(tmp_path, monkeypatch):
    _run(tmp_path / "full")
    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # after three epochs: the network is narrower than it started
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut")
    monkeypatch.setattr(training, "train_epoch", real)
    saved = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert saved["regularizer"]["steps_done"] == 3 and saved["regularizer"]["regularizer"]["focus"] is not None
    _run(tmp_path / "cut", model=_model(seed=11), resume_from=saved)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["architecture"] == b["architecture"] and a["regularizer"] == b["regularizer"]
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key  # bitwise on CPU

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_seconds", "time", "images_per_second")}
                for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    assert rows("cut") == rows("full")


def test_a_bad_budget_is_refused_before_the_run_directory_exists(tmp_path):
    with pytest.raises(ValueError, match="cannot be met"):
        _run_bad = BudgetPruner(_model(), X0, target_flops=1e-4, epochs=30)  # noqa: F841
    with pytest.raises(RunTooShortError, match="too few"):
        BudgetPruner(_model(), X0, target_flops=0.05, epochs=4)
    assert not (tmp_path / "run").exists()
