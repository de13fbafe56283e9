"""rnip_ext.training.fit: checkpoints, resume, the epoch callback, non-finite losses, no per-step syncs."""

import copy
import os

import pytest
import torch
from torch import nn

from rnip_ext import BoundedBatchNorm2d, training
from rnip_ext.data import DataSplits, InMemoryDataset
from rnip_ext.rundir import MANIFEST, load_checkpoint, read_manifest
from rnip_ext.training import FitState, NonFiniteLossError, fit, make_optimizer, make_regularizer, make_scheduler


def tiny_splits(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()  # learnable: bright vs dark
    data = InMemoryDataset(images, labels, (0.5,), (0.25,), augment_flips=False)
    third = n // 3
    return DataSplits(data.subset(torch.arange(third, n)), data.subset(torch.arange(third)),
                      data.subset(torch.arange(third)), 2, 1, 8)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), BoundedBatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def run_fit(model, out, epochs, **kw):
    reg = make_regularizer(model, "rni", 1e-3, 3.0)
    return fit(model, tiny_splits(), out, epochs=epochs, lr=0.05, batch_size=8, regularizer=reg, progress=False,
               **kw)


def test_fit_writes_checkpoints_metrics_and_manifest(tmp_path):
    best = run_fit(tiny_model(), tmp_path / "run", 3)
    rows = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if l]
    assert len(rows) == 3 and 1 <= best["epoch"] <= 3 and 0 <= best["val_accuracy"] <= 1
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert int(last["epoch"]) == 2 and int(last["best_epoch"]) == best["epoch"]
    assert {"metrics.jsonl", "best.pt", "last.pt"} <= set(read_manifest(str(tmp_path / "run"))["files"])


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    full = tiny_model()
    run_fit(full, tmp_path / "full", 3)

    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tiny_model(), tmp_path / "cut", 3)
    monkeypatch.setattr(training, "train_epoch", real)
    resumed = tiny_model(seed=123)  # whatever it starts from, the checkpoint replaces it
    run_fit(resumed, tmp_path / "cut", 3, resume_from=load_checkpoint(str(tmp_path / "cut" / "last.pt")))
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key  # bitwise on CPU
    rows_full = [l.split('"time"')[0] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    rows_cut = [l.split('"time"')[0] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [r.split('"images_per_second"')[0] for r in rows]  # noqa: E731
    assert strip(rows_cut) == strip(rows_full) and len(rows_cut) == 3


def test_epoch_callback_can_swap_model_and_optimizer(tmp_path):
    seen = []

    def shrink(state: FitState):
        seen.append((state.epoch, state.epochs, state.metrics["epoch"]))
        if state.epoch == 1:  # e.g. prune between epochs: here a narrower copy of the network
            small = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), BoundedBatchNorm2d(3), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
            state.model = small
            state.optimizer = make_optimizer(small, 0.05)
            state.scheduler = make_scheduler(state.optimizer, state.epochs)
            state.regularizer = make_regularizer(small, "rni", 1e-3, 3.0)

    run_fit(tiny_model(), tmp_path / "run", 2, on_epoch_end=shrink)
    assert seen == [(1, 2, 1), (2, 2, 2)]
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert last["model"]["0.weight"].shape == (3, 1, 3, 3)  # last.pt holds what the callback left

    def bad(state):
        state.optimizer = make_optimizer(state.model, 0.1)

    with pytest.raises(ValueError, match="scheduler"):
        run_fit(tiny_model(), tmp_path / "bad", 1, on_epoch_end=bad)


class NaNAfter(nn.Module):
    """The tiny model, whose output turns NaN once ``poisoned`` is set (a diverging run)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()
        self.poisoned = False

    def forward(self, x):
        if self.poisoned:
            x = x * float("nan")
        return self.net(x)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = NaNAfter()

    def poison(state):
        model.poisoned = True

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*still holds epoch 1, untouched"):
        run_fit(model, out, 3, on_epoch_end=poison)
    before = (out / "last.pt").read_bytes()
    last = load_checkpoint(str(out / "last.pt"))
    assert int(last["epoch"]) == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    # A resume continues from the good epoch; the checkpoint was not rewritten by the failure.
    assert (out / "last.pt").read_bytes() == before
    with pytest.raises(NonFiniteLossError, match="nothing of this run was checkpointed"):
        poisoned = NaNAfter()
        poisoned.poisoned = True
        run_fit(poisoned, tmp_path / "fresh", 1)
    assert not (tmp_path / "fresh" / "last.pt").exists()


def test_train_epoch_reads_back_once_per_logging_interval(monkeypatch):
    splits = tiny_splits(n=72)  # 48 training images, batch 8: 6 steps
    model = tiny_model()
    opt = make_optimizer(model, 0.05)
    counts = {"item": 0, "tolist": 0}
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist

    def item(self):
        counts["item"] += 1
        return real_item(self)

    def tolist(self):
        counts["tolist"] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    reg = make_regularizer(model, "rni", 1e-3, 3.0)
    stats = training.train_epoch(model, splits.train, opt, 8, reg, progress=False)
    assert counts == {"item": 0, "tolist": 1}
    assert stats.loss > 0 and 0 <= stats.accuracy <= 1 and stats.penalty > 0
    counts.update(item=0, tolist=0)
    training.train_epoch(model, splits.train, opt, 8, reg, progress=True, log_every=2)
    assert counts == {"item": 0, "tolist": 6 // 2 + 1}


def test_train_epoch_means_match_a_per_step_reference():
    splits = tiny_splits()
    model = tiny_model()
    ref = copy.deepcopy(model)
    stats = training.train_epoch(model, splits.train, make_optimizer(model, 0.05), 8, None, progress=False,
                                 generator=torch.Generator().manual_seed(5))
    # The same epoch by hand, reading every step back (float64 sums).
    opt = make_optimizer(ref, 0.05)
    ref.train()
    loss_sum = correct = total = 0.0
    gen = torch.Generator().manual_seed(5)
    for x, y in splits.train.batches(8, shuffle=True, augment=True, generator=gen, drop_last=True):
        out = ref(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    assert stats.loss == pytest.approx(loss_sum / total, rel=1e-6)
    assert stats.accuracy == pytest.approx(correct / total)


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    run_fit_kw = dict(progress=True)
    reg = None
    fit(tiny_model(), tiny_splits(), tmp_path / "run", epochs=2, lr=0.05, batch_size=8, regularizer=reg,
        description="demo", **run_fit_kw)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["demo epoch 1/2", "demo epoch 2/2"]
    assert "\r" not in captured.out and "\r" not in captured.err


def test_manifest_is_written_before_files(tmp_path):
    run_fit(tiny_model(), tmp_path / "run", 1)
    assert os.path.isfile(tmp_path / "run" / MANIFEST)


def test_a_fresh_fit_never_replaces_another_runs_files(tmp_path):
    from rnip_ext.rundir import OutputDirError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own log\n")
    with pytest.raises(OutputDirError, match="already holds metrics.jsonl"):
        run_fit(tiny_model(), out, 1)
    assert (out / "metrics.jsonl").read_text() == "my own log\n" and sorted(os.listdir(out)) == ["metrics.jsonl"]


# -- pruning between epochs -------------------------------------------------------------------

def _prune_half_at(epoch: int, seen: list | None = None):
    """A callback removing the lower half of the BatchNorm's channels after ``epoch``."""
    from rnip_ext import pruning

    def callback(state: FitState):
        if seen is not None:
            seen.append((state.epoch, id(state.optimizer), id(state.scheduler)))
        if state.epoch == epoch:
            p = pruning.plan(state.model, 0.5, min_channels=1, example_inputs=torch.zeros(1, 1, 8, 8))
            state.model = pruning.apply(state.model, p, optimizer=state.optimizer)

    return callback


def test_a_callback_may_prune_and_training_goes_on_with_the_same_optimizer(tmp_path):
    from rnip_ext import pruning

    model = tiny_model()
    reg = make_regularizer(model, "rni", 1e-3, 3.0)
    seen = []
    fit(model, tiny_splits(), tmp_path / "run", epochs=4, lr=0.05, batch_size=8, regularizer=reg, progress=False,
        on_epoch_end=_prune_half_at(1, seen))
    # One optimiser and one scheduler throughout (rebound in place); the lr milestones still fire.
    assert len({s[1] for s in seen}) == 1 and len({s[2] for s in seen}) == 1
    rows = [__import__("json").loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005, 0.0005])
    assert all(r["wall_seconds"] > 0 for r in rows)
    # The regulariser follows the narrower model.
    assert [m.num_features for m in reg.layers] == [3]
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert last["model"]["0.weight"].shape == (3, 1, 3, 3)
    # The checkpoint restores into a fresh, unpruned model (narrowed first) and computes the same.
    fresh = pruning.restore(tiny_model(seed=7), last["model"], last["architecture"]).eval()
    trained = tiny_model(seed=9)
    pruning.restore(trained, last["model"], last["architecture"])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained.eval()(x), rtol=0, atol=0)
    assert fresh[1].num_features == 3 and fresh[5].in_features == 3
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert "architecture" in best
    pruning.restore(tiny_model(), best["model"], best["architecture"])


def test_resume_of_a_run_pruned_during_training_equals_uninterrupted(tmp_path, monkeypatch):
    full = tiny_model()
    reg_full = make_regularizer(full, "rni", 1e-3, 3.0)
    fit(full, tiny_splits(), tmp_path / "full", epochs=3, lr=0.05, batch_size=8, regularizer=reg_full,
        progress=False, on_epoch_end=_prune_half_at(1))

    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    cut = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        fit(cut, tiny_splits(), tmp_path / "cut", epochs=3, lr=0.05, batch_size=8,
            regularizer=make_regularizer(cut, "rni", 1e-3, 3.0), progress=False, on_epoch_end=_prune_half_at(1))
    monkeypatch.setattr(training, "train_epoch", real)
    resumed = tiny_model(seed=123)  # unpruned: the checkpoint's architecture narrows it
    reg = make_regularizer(resumed, "rni", 1e-3, 3.0)
    fit(resumed, tiny_splits(), tmp_path / "cut", epochs=3, lr=0.05, batch_size=8, regularizer=reg,
        progress=False, on_epoch_end=_prune_half_at(1),
        resume_from=load_checkpoint(str(tmp_path / "cut" / "last.pt")))
    final = load_checkpoint(str(tmp_path / "full" / "last.pt"))["model"]
    got = load_checkpoint(str(tmp_path / "cut" / "last.pt"))["model"]
    assert set(got) == set(final)
    for key, value in final.items():
        assert torch.equal(got[key], value), key  # bitwise on CPU
    assert [m.num_features for m in reg.layers] == [3]


def test_a_pruned_model_without_the_rebound_optimizer_is_refused(tmp_path):
    from rnip_ext import pruning

    def forgetful(state):
        p = pruning.plan(state.model, 0.5, min_channels=1, example_inputs=torch.zeros(1, 1, 8, 8))
        state.model = pruning.apply(state.model, p)  # no optimizer=: its parameters are new objects

    with pytest.raises(ValueError, match="optimizer still serves other parameters"):
        run_fit(tiny_model(), tmp_path / "run", 2, on_epoch_end=forgetful)
    # The epoch's last.pt was not written with a model the optimiser does not serve.
    assert not (tmp_path / "run" / "last.pt").exists()


def test_pruning_with_amp_grad_scaler_keeps_training(tmp_path):
    model = tiny_model()
    best = fit(model, tiny_splits(), tmp_path / "run", epochs=3, lr=0.05, batch_size=8,
               regularizer=make_regularizer(model, "rni", 1e-3, 3.0), progress=False, amp="fp16",
               on_epoch_end=_prune_half_at(1))
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert last["scaler"] is not None and last["scaler"]["scale"] > 0
    assert last["model"]["1.weight"].shape == (3,)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert 0 <= best["val_accuracy"] <= 1


def test_old_checkpoints_without_architecture_still_resume(tmp_path):
    run_fit(tiny_model(), tmp_path / "run", 1)
    path = str(tmp_path / "run" / "last.pt")
    old = load_checkpoint(path)
    del old["architecture"], old["strength"], old["callback"]  # what runs written before looked like
    model = tiny_model(seed=5)
    run_fit(model, tmp_path / "run", 2, resume_from=old)
    assert int(load_checkpoint(path)["epoch"]) == 1


def test_compiled_runner_is_rebuilt_for_the_pruned_model(tmp_path, monkeypatch):
    """compile=True: after a prune the runner is compiled again for the narrower model (the
    eager backend here keeps the test fast; inductor recompiles the same way)."""
    real, compiled = torch.compile, []

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    model = tiny_model()
    fit(model, tiny_splits(), tmp_path / "run", epochs=3, lr=0.05, batch_size=8, compile=True,
        regularizer=make_regularizer(model, "rni", 1e-3, 3.0), progress=False, on_epoch_end=_prune_half_at(1))
    assert len(compiled) == 2 and compiled[0] is model
    assert compiled[1][1].num_features == 3  # the second runner wraps the pruned network
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert not any(k.startswith("_orig_mod") for k in last["model"])  # the plain module's state


def test_make_regularizer_penalty_choice():
    from rnip_ext import models as M

    model = M.vgg_small(widths=(4, 4, 8))
    assert make_regularizer(model, "rni", 1e-3, 3.0).normalize == "layer"
    assert make_regularizer(model, "rni", 1e-3, 3.0, "paper").normalize is None
    with pytest.raises(ValueError, match="penalty must be one of"):
        make_regularizer(model, "rni", 1e-3, 3.0, "other")
