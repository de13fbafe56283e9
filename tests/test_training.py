"""rnip_ext.training: the trainer, its callbacks, data sources, resume, non-finite losses, no per-step syncs."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from rnip_ext import BoundedBatchNorm2d, pruning, training
from rnip_ext.callbacks import BudgetPruning, Callback, Checkpoint, run_callbacks
from rnip_ext.data import DataSplits, InMemoryDataset
from rnip_ext.rundir import MANIFEST, OutputDirError, load_checkpoint, read_manifest
from rnip_ext.training import NonFiniteLossError, Trainer, fit, make_optimizer, make_regularizer

X0 = torch.zeros(1, 1, 8, 8)


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


def run_fit(model, out, epochs, *, callbacks=(), resume_from=None, **kw):
    splits = tiny_splits()
    reg = kw.pop("regularizer", make_regularizer(model, "rni", 1e-3, 3.0))
    return fit(model, splits, epochs=epochs, lr=0.05, batch_size=8, regularizer=reg, progress=False,
               callbacks=[*run_callbacks(out, splits)[:2], *callbacks, *run_callbacks(out, splits)[2:]],
               resume_from=resume_from, **kw)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fit_writes_checkpoints_metrics_and_manifest(tmp_path):
    best = run_fit(tiny_model(), tmp_path / "run", 3)
    assert [r["epoch"] for r in rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert 1 <= best["epoch"] <= 3 and 0 <= best["val_accuracy"] <= 1
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert int(last["epoch"]) == 2 and last["callbacks"]["best"]["epoch"] == best["epoch"]
    assert {"metrics.jsonl", "best.pt", "last.pt"} <= set(read_manifest(str(tmp_path / "run"))["files"])


def _interrupt_at(monkeypatch, epoch):
    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(training, "train_epoch", real)


def _strip(path):
    return [{k: v for k, v in r.items() if k not in ("wall_seconds", "time", "images_per_second")} for r in rows(path)]


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, monkeypatch):
    full = tiny_model()
    run_fit(full, tmp_path / "full", 3)
    restore = _interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tiny_model(), tmp_path / "cut", 3)
    restore()
    resumed = tiny_model(seed=123)  # whatever it starts from, the checkpoint replaces it
    run_fit(resumed, tmp_path / "cut", 3, resume_from=load_checkpoint(str(tmp_path / "cut" / "last.pt")))
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key  # bitwise on CPU
    assert _strip(tmp_path / "cut" / "metrics.jsonl") == _strip(tmp_path / "full" / "metrics.jsonl")


class PruneHalfAt(Callback):
    """Removes the lower half of the BatchNorm's channels in place after ``epoch``."""

    def __init__(self, epoch):
        self.epoch, self.seen = epoch, []

    def on_epoch_end(self, trainer, metrics):
        self.seen.append((trainer.epoch, id(trainer.optimizer), id(trainer.scheduler)))
        if trainer.epoch == self.epoch:
            p = pruning.plan(trainer.model, 0.5, min_channels=1, example_inputs=X0)
            pruning.apply(trainer.model, p, optimizer=trainer.optimizer, inplace=True)


def test_a_callback_may_narrow_the_model_and_training_goes_on(tmp_path):
    model = tiny_model()
    reg = make_regularizer(model, "rni", 1e-3, 3.0)
    cb = PruneHalfAt(1)
    run_fit(model, tmp_path / "run", 4, callbacks=[cb], regularizer=reg)
    assert len({s[1] for s in cb.seen}) == 1 and len({s[2] for s in cb.seen}) == 1
    r = rows(tmp_path / "run" / "metrics.jsonl")
    assert [x["lr"] for x in r] == pytest.approx([0.05, 0.05, 0.005, 0.0005])  # the milestones still fire
    assert all(x["wall_seconds"] > 0 for x in r)
    assert [m.num_features for m in reg.layers] == [3]  # the regulariser follows
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert last["model"]["0.weight"].shape == (3, 1, 3, 3)
    fresh = pruning.restore(tiny_model(seed=7), last["model"], last["architecture"]).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.eval()(x), rtol=0, atol=0)
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    pruning.restore(tiny_model(), best["model"], best["architecture"])


def test_resume_of_a_run_pruned_during_training_equals_uninterrupted(tmp_path, monkeypatch):
    full = tiny_model()
    run_fit(full, tmp_path / "full", 3, callbacks=[PruneHalfAt(1)])
    restore = _interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_fit(tiny_model(), tmp_path / "cut", 3, callbacks=[PruneHalfAt(1)])
    restore()
    resumed = tiny_model(seed=123)  # unpruned: the checkpoint's architecture narrows it in place
    reg = make_regularizer(resumed, "rni", 1e-3, 3.0)
    params = {id(p) for p in resumed.parameters()}
    run_fit(resumed, tmp_path / "cut", 3, callbacks=[PruneHalfAt(1)], regularizer=reg,
            resume_from=load_checkpoint(str(tmp_path / "cut" / "last.pt")))
    assert {id(p) for p in resumed.parameters()} == params
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key  # bitwise on CPU
    assert [m.num_features for m in reg.layers] == [3]


class NaNAfter(nn.Module):
    """The tiny model, whose output turns NaN once ``poisoned`` is set (a diverging run)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()
        self.poisoned = False

    def forward(self, x):
        return self.net(x * float("nan") if self.poisoned else x)


class Poison(Callback):
    def __init__(self, model):
        self.model = model

    def on_epoch_end(self, trainer, metrics):
        self.model.poisoned = True


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = NaNAfter()
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*still holds epoch 1, untouched"):
        run_fit(model, out, 3, callbacks=[Poison(model)])
    last = load_checkpoint(str(out / "last.pt"))
    assert int(last["epoch"]) == 0 and len(rows(out / "metrics.jsonl")) == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    poisoned = NaNAfter()
    poisoned.poisoned = True
    with pytest.raises(NonFiniteLossError, match="nothing of this run was checkpointed"):
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
    stats = training.train_epoch(model, splits.train.batches(8), opt, regularizer=reg)
    assert counts == {"item": 0, "tolist": 1}
    assert stats.loss > 0 and 0 <= stats.accuracy <= 1 and stats.penalty > 0
    counts.update(item=0, tolist=0)
    training.train_epoch(model, splits.train.batches(8), opt, regularizer=reg, progress=True, log_every=2)
    assert counts == {"item": 0, "tolist": 6 // 2 + 1}


def test_train_epoch_means_match_a_per_step_reference():
    splits = tiny_splits()
    model = tiny_model()
    ref = copy.deepcopy(model)
    batches = list(splits.train.batches(8, shuffle=True, augment=True, generator=torch.Generator().manual_seed(5)))
    stats = training.train_epoch(model, iter(batches), make_optimizer(model, 0.05))
    opt = make_optimizer(ref, 0.05)
    ref.train()
    loss_sum = correct = total = 0.0
    for x, y in batches:  # the same epoch by hand, reading every step back
        out = ref(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    assert stats.loss == pytest.approx(loss_sum / total, rel=1e-6)
    assert stats.accuracy == pytest.approx(correct / total)


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    fit(tiny_model(), tiny_splits(), epochs=2, lr=0.05, batch_size=8, description="demo",
        callbacks=run_callbacks(tmp_path / "run", tiny_splits()))
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["demo epoch 1/2", "demo epoch 2/2"]
    assert "\r" not in captured.out and "\r" not in captured.err


def test_manifest_is_written_before_files(tmp_path):
    run_fit(tiny_model(), tmp_path / "run", 1)
    assert os.path.isfile(tmp_path / "run" / MANIFEST)


def test_a_fresh_fit_never_replaces_another_runs_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own log\n")
    with pytest.raises(OutputDirError, match="already holds metrics.jsonl"):
        run_fit(tiny_model(), out, 1)
    assert (out / "metrics.jsonl").read_text() == "my own log\n" and sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_pruning_with_amp_grad_scaler_keeps_training(tmp_path):
    model = tiny_model()
    best = run_fit(model, tmp_path / "run", 3, amp="fp16", callbacks=[PruneHalfAt(1)])
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert last["scaler"] is not None and last["scaler"]["scale"] > 0
    assert last["model"]["1.weight"].shape == (3,)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert 0 <= best["val_accuracy"] <= 1


def test_checkpoints_of_earlier_versions(tmp_path):
    run_fit(tiny_model(), tmp_path / "run", 1)
    path = str(tmp_path / "run" / "last.pt")
    new = load_checkpoint(path)
    # What train runs written before this format looked like: best values at the top, no architecture.
    old = {k: v for k, v in new.items() if k not in ("format", "callbacks", "architecture")}
    old.update(best_val=new["callbacks"]["best"]["val_accuracy"], best_epoch=1, best_test=0.5,
               strength=1e-3, regularizer=None, callback=None)
    run_fit(tiny_model(seed=5), tmp_path / "run", 2, resume_from=old)
    assert int(load_checkpoint(path)["epoch"]) == 1
    old["callback"] = {"original_flops": 10, "history": []}  # an older budget run: refused, clearly
    with pytest.raises(ValueError, match="budget run of an older rnip_ext"):
        run_fit(tiny_model(), tmp_path / "run", 3, resume_from=old)


def test_compiled_model_follows_a_narrowing_in_place(tmp_path, monkeypatch):
    """compile=True: the compiled runner wraps the same module, which recompiles for the narrower
    shapes (the eager backend keeps the test fast; inductor recompiles the same way)."""
    real, compiled = torch.compile, []

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    model = tiny_model()
    run_fit(model, tmp_path / "run", 3, compile=True, callbacks=[PruneHalfAt(1)])
    assert all(m is model for m in compiled) and model[1].num_features == 3
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert not any(k.startswith("_orig_mod") for k in last["model"])  # the plain module's state


# -- data sources, the user's optimiser, loss and scheduler -------------------------------------

class Pairs(torch.utils.data.Dataset):
    def __init__(self, splits):
        self.x = torch.stack([x for x, _ in splits.train.batches(1)]).squeeze(1)
        self.y = splits.train.labels

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __iter__(self):
        return (self.pairs[i] for i in range(len(self.pairs)))


def test_any_torch_data_source_trains_and_the_dataset_path_resumes_bitwise(tmp_path, monkeypatch):
    splits = tiny_splits()
    pairs = Pairs(splits)
    kw = dict(epochs=2, lr=0.05, batch_size=8, progress=False)
    for data in (pairs, Stream(pairs), DataLoader(pairs, batch_size=8, shuffle=True)):
        model = tiny_model()
        before = copy.deepcopy(model.state_dict())
        fit(model, data, callbacks=[training.Evaluate(pairs, splits.test)], **kw)
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # A map-style Dataset with a worker process: a resumed run replays the same batches.
    full = tiny_model()
    fit(full, pairs, num_workers=1, callbacks=[Checkpoint(tmp_path / "full")], **dict(kw, epochs=3))
    restore = _interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), pairs, num_workers=1, callbacks=[Checkpoint(tmp_path / "cut")], **dict(kw, epochs=3))
    restore()
    resumed = tiny_model(seed=4)
    fit(resumed, pairs, num_workers=1, callbacks=[Checkpoint(tmp_path / "cut")], **dict(kw, epochs=3),
        resume_from=load_checkpoint(str(tmp_path / "cut" / "last.pt")))
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for bad, match in (((splits.train.images, splits.train.labels), "cannot train on a tuple"),
                       ({"train": pairs}, "cannot train on a dict")):
        with pytest.raises(TypeError, match=match):
            fit(tiny_model(), bad, **kw)
    with pytest.raises(TypeError, match=r"a batch must be \(inputs, targets\)"):
        fit(tiny_model(), DataLoader([{"x": torch.zeros(1, 8, 8)}] * 8, batch_size=4), **kw)


def test_the_users_optimizer_loss_and_per_step_scheduler():
    splits = tiny_splits()
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=2 * 4)
    calls = []

    def loss(out, y):
        calls.append(1)
        return F.cross_entropy(out, y, label_smoothing=0.1)

    fit(model, splits, epochs=2, optimizer=opt, scheduler=sched, scheduler_step="step", loss=loss, batch_size=8,
        progress=False)
    assert len(calls) == 8 and sched.last_epoch == 8
    with pytest.raises(ValueError, match="not the model's"):
        fit(tiny_model(), splits, epochs=1, optimizer=opt, progress=False)
    with pytest.raises(ValueError, match="needs the optimizer it was built on"):
        fit(tiny_model(), splits, epochs=1, scheduler=sched, progress=False)
    with pytest.raises(TypeError, match="is not a regulariser"):
        fit(tiny_model(), splits, epochs=1, regularizer=lambda: torch.zeros(()), progress=False)


def test_make_regularizer_penalty_choice():
    from rnip_ext import models as M

    model = M.vgg_small(widths=(4, 4, 8))
    assert make_regularizer(model, "rni", 1e-3, 3.0).normalize == "layer"
    assert make_regularizer(model, "rni", 1e-3, 3.0, "paper").normalize is None
    with pytest.raises(ValueError, match="penalty must be one of"):
        make_regularizer(model, "rni", 1e-3, 3.0, "other")


def test_trainer_state_keys_must_differ():
    with pytest.raises(TypeError, match="distinct state_key"):
        Trainer(tiny_model(), tiny_splits(), epochs=1, callbacks=[Checkpoint("a"), Checkpoint("b")])
