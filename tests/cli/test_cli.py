"""The `rnip` command end to end on tiny generated CIFAR-format data and on the digits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from data_helpers import write_cifar
from rnip_ext import training
from rnip_ext.cli import main
from rnip_ext.rundir import load_checkpoint
from rnip_ext.rundir import MANIFEST


def write_tiny_cifar(root):
    write_cifar(root, "cifar10", n_per_file=24)


def train_args(data_dir, out, *extra):
    return ["train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir", str(data_dir), "--epochs", "1",
            "--batch-size", "16", "--val-fraction", "0.2", "--out", str(out), "--no-progress", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def one_error_line(capsys, match=None):
    """stderr holds exactly one line, ``error: ...`` (no traceback); returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    if match is not None:
        import re

        assert re.search(match, lines[0]), lines[0]
    return lines[0]


def interrupt_on_call(monkeypatch, n):
    """Ctrl-C at the start of the n-th epoch."""
    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(training, "train_epoch", real)


def snapshot(directory):
    """Every file under ``directory`` with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


def test_train_interrupt_resume_prune_report(tmp_path, monkeypatch, capsys):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    args = train_args(tmp_path / "data", run)
    args[args.index("--epochs") + 1] = "2"

    # Ctrl-C during the second epoch: the first epoch's checkpoint survives and is resumable.
    restore = interrupt_on_call(monkeypatch, 2)
    assert main(args) == 130
    restore()
    err = capsys.readouterr().err
    assert f"continue with: rnip {' '.join(args)} --resume" in err  # the full command, not "..."

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "rni" and config["bn"] == "bounded"
    assert config["strength"] == 1e-3 and config["shift"] == 3.0  # the paper's VGG settings
    assert config["penalty"] == "layer"  # the library's default receding penalty
    assert config["versions"]["torch"] == torch.__version__
    assert config["train_size"] == 96 and config["val_size"] == 24 and config["test_size"] == 24
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1] and 0 <= rows[0]["val_accuracy"] <= 1 and rows[0]["penalty"] > 0
    last = load_checkpoint(str(run / "last.pt"))
    assert int(last["epoch"]) == 0
    assert not (run / "summary.json").exists()

    # A second invocation without --resume must not clobber the run.
    before = snapshot(run)
    assert main(args) == 2
    one_error_line(capsys, "already holds a train run; pass --resume")
    # Resuming with different settings is refused (the schedule depends on --epochs too) ...
    assert main(args + ["--method", "l1", "--resume"]) == 2
    one_error_line(capsys, "settings differ.*method")
    changed_epochs = list(args)
    changed_epochs[changed_epochs.index("--epochs") + 1] = "3"
    assert main(changed_epochs + ["--resume"]) == 2
    one_error_line(capsys, "settings differ.*epochs")
    assert main(args + ["--penalty", "paper", "--resume"]) == 2
    one_error_line(capsys, "settings differ.*penalty")
    assert snapshot(run) == before
    # ... with the same ones it finishes the run.
    assert main(args + ["--resume"]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "train" and 1 <= summary["best_epoch"] <= 2

    pruned = tmp_path / "pruned"
    assert main(["prune", str(run), "--ratio", "0.5", "--finetune-epochs", "1", "--out", str(pruned),
                 "--no-progress"]) == 0
    ps = json.loads((pruned / "summary.json").read_text())
    assert ps["params"] < ps["params_before"] and ps["flops"] < ps["flops_before"]
    assert ps["achieved_ratio"] == pytest.approx(0.5)
    from rnip_ext.pruning import load

    small = load(str(pruned / "pruned.pt"))
    assert sum(p.numel() for p in small.parameters()) == ps["params"]

    report = tmp_path / "report"
    assert main(["report", str(run), str(pruned), "--out", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "| vgg_small | cifar10 | rni | - | 0% |" in text and "| vgg_small | cifar10 | rni | global | 50% |" in text
    for name in ("importance_histogram", "accuracy_vs_ratio", "kept_channels"):
        assert (report / f"{name}.png").stat().st_size > 1000
    # A report replaces its own earlier output.
    assert main(["report", str(run), "--out", str(report), "--no-plots"]) == 0
    assert not (report / "kept_channels.png").exists() and "50%" not in (report / "report.md").read_text()


def test_corrupt_checkpoint_is_reported_and_nothing_is_lost(tmp_path, capsys):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_args(tmp_path / "data", run)) == 0
    (run / "last.pt").write_bytes(b"\x00garbage")
    before = snapshot(run)
    capsys.readouterr()
    assert main(train_args(tmp_path / "data", run, "--resume")) == 2
    one_error_line(capsys, "cannot resume.*corrupt")
    (run / "config.json").write_text("{not json")
    before = snapshot(run)
    assert main(train_args(tmp_path / "data", run, "--resume")) == 2
    one_error_line(capsys, "cannot resume.*config.json is not valid JSON")
    assert snapshot(run) == before


def test_mixed_precision_and_channels_last_train(tmp_path):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_args(tmp_path / "data", run, "--amp", "bf16", "--channels-last", "--method", "l1")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["amp"] == "bf16" and config["channels_last"] and config["bn"] == "plain"
    assert config["strength"] == 1e-4  # network slimming's VGG setting
    state = load_checkpoint(str(run / "best.pt"))["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # master weights stay fp32


def test_download_without_torchvision_says_where_to_get_the_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on a machine without it
    assert main(train_args(tmp_path / "data", tmp_path / "run", "--download")) == 2
    one_error_line(capsys, r"torchvision.*cifar-10-python.tar.gz")
    assert not (tmp_path / "run").exists()


def _write_float_cifar(root, low, high):
    import pickle

    import numpy as np

    write_cifar(root, "cifar10", n_per_file=24)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry[b"data"] = np.linspace(low, high, entry[b"data"].size).reshape(entry[b"data"].shape)
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _truncate(root):
    write_cifar(root, "cifar10", n_per_file=24)
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])


def _wrong_keys(root):
    import pickle

    write_cifar(root, "cifar10", n_per_file=24)
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry[b"fine_labels"] = entry.pop(b"labels")
    with open(path, "wb") as f:
        pickle.dump(entry, f)


@pytest.mark.parametrize("make_data, extra, match", [
    (None, [], "cifar-10-batches-py.*missing data_batch_1"),
    (lambda r: write_cifar(r, "cifar10", n_per_file=24), ["--lr", "0"], r"--lr must be > 0"),
    (lambda r: write_cifar(r, "cifar10", n_per_file=24), ["--lr", "-1"], r"--lr must be > 0"),
    (lambda r: write_cifar(r, "cifar10", n_per_file=24), ["--val-fraction", "0"], r"--val-fraction must be in \(0"),
    (lambda r: write_cifar(r, "cifar10", n_per_file=24), ["--val-fraction", "1.5"], r"--val-fraction must be in"),
    (lambda r: write_cifar(r, "cifar10", n_per_file=24), ["--arch", "alexnet"], "invalid choice: 'alexnet'"),
    (lambda r: write_cifar(r, "cifar10", n_per_file=24), ["--epochs", "x"], "invalid int value"),
    (_truncate, [], "test_batch is not a CIFAR python-pickle batch"),
    (_wrong_keys, [], r"data_batch_1 is not a CIFAR batch of this dataset: no b'labels'"),
    (lambda r: _write_float_cifar(r, -3.0, 300.0), [], r"data_batch_2: image data must be integers 0..255"),
    (lambda r: _write_float_cifar(r, 0.0, 1.0), [], r"scaled or normalised images are not accepted"),
])
def test_train_user_errors_are_one_line_and_leave_no_out(tmp_path, capsys, make_data, extra, match):
    if make_data is not None:
        make_data(tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_args(tmp_path / "data", out, *extra)) == 2
    one_error_line(capsys, match)
    assert not out.exists()  # a failed command leaves no empty --out behind


def test_prune_and_report_user_errors(tmp_path, capsys):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_args(tmp_path / "data", run)) == 0
    capsys.readouterr()
    out = tmp_path / "p"
    for extra, match in ((["--min-channels", "0"], "--min-channels must be >= 1"),
                         (["--ratio", "1.0"], r"--ratio must be in \[0, 1\)"),
                         (["--lr", "0"], "--lr must be > 0"),
                         (["--min-channels", "1000"], "min_channels=1000 is at least the width of every")):
        assert main(["prune", str(run), "--out", str(out), "--no-progress", *extra]) == 2
        one_error_line(capsys, match)
        assert not out.exists()
    assert main(["prune", str(run), "--out", str(out), "--resume", "--overwrite"]) == 2
    one_error_line(capsys, "pass one of them")
    assert main(["prune", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    one_error_line(capsys, "is not a finished `rnip train` run")
    summary = json.loads((run / "summary.json").read_text())
    del summary["flops"], summary["arch"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    one_error_line(capsys, r"summary.json lacks arch, flops")
    assert not (tmp_path / "rep").exists()


def test_commands_never_write_into_foreign_or_other_runs(tmp_path, capsys):
    """The data-loss cases of issue 13: the victims' files stay byte-identical."""
    write_tiny_cifar(tmp_path / "data")
    # A user's own folder with files named like ours.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "metrics.jsonl").write_text("precious\n")
    before = snapshot(mine)
    assert main(train_args(tmp_path / "data", mine)) == 2
    line = one_error_line(capsys)
    assert str(mine) in line and "config.json" in line and "metrics.jsonl" in line
    assert main(train_args(tmp_path / "data", mine, "--overwrite")) == 2
    one_error_line(capsys, "rnip did not record writing.*nothing was deleted")
    assert snapshot(mine) == before

    # An interrupted (resumable) training run is not replaced by `rnip prune --out`.
    finished = tmp_path / "finished"
    assert main(train_args(tmp_path / "data", finished)) == 0
    interrupted = tmp_path / "interrupted"
    args = train_args(tmp_path / "data", interrupted)
    args[args.index("--epochs") + 1] = "3"
    import rnip_ext.training as T

    real, calls = T.train_epoch, []

    def stop(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    T.train_epoch = stop
    try:
        assert main(args) == 130
    finally:
        T.train_epoch = real
    capsys.readouterr()
    before = snapshot(interrupted)
    assert main(["prune", str(finished), "--finetune-epochs", "1", "--out", str(interrupted), "--no-progress"]) == 2
    one_error_line(capsys, "holds a train run")
    assert snapshot(interrupted) == before
    assert main(args + ["--resume"]) == 0  # still resumable

    # A finished prune run is not overwritten by `rnip train`.
    pruned = tmp_path / "pruned"
    assert main(["prune", str(finished), "--finetune-epochs", "0", "--out", str(pruned), "--no-progress"]) == 0
    capsys.readouterr()
    before = snapshot(pruned)
    assert main(train_args(tmp_path / "data", pruned)) == 2
    one_error_line(capsys, "holds a prune run")
    assert snapshot(pruned) == before

    # --overwrite clears only what rnip wrote; a stray user file blocks it and survives.
    (pruned / "notes.txt").write_text("mine")
    before = snapshot(pruned)
    assert main(train_args(tmp_path / "data", pruned, "--overwrite")) == 2
    one_error_line(capsys, "notes.txt")
    assert snapshot(pruned) == before
    (pruned / "notes.txt").unlink()
    assert main(train_args(tmp_path / "data", pruned, "--overwrite")) == 0
    assert json.loads((pruned / "summary.json").read_text())["kind"] == "train"
    assert not (pruned / "pruned.pt").exists()


def test_prune_interrupt_is_resumable(tmp_path, monkeypatch, capsys):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_args(tmp_path / "data", run)) == 0
    out = tmp_path / "pruned"
    args = ["prune", str(run), "--ratio", "0.5", "--finetune-epochs", "2", "--out", str(out), "--no-progress"]
    # Ctrl-C before the first fine-tuning epoch finished: nothing saved, nothing left behind.
    restore = interrupt_on_call(monkeypatch, 1)
    assert main(args) == 130
    restore()
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err
    assert not out.exists()
    # Ctrl-C in the second epoch: resumable, and the hint is the full command.
    restore = interrupt_on_call(monkeypatch, 2)
    assert main(args) == 130
    restore()
    assert f"continue with: rnip {' '.join(args)} --resume" in capsys.readouterr().err
    assert int(load_checkpoint(str(out / "last.pt"))["epoch"]) == 0 and not (out / "summary.json").exists()
    assert main(args + ["--resume"]) == 0
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["kind"] == "prune"
    # A different ratio cannot resume this fine-tuning.
    changed = list(args)
    changed[changed.index("--ratio") + 1] = "0.25"
    assert main(changed + ["--resume"]) == 2
    one_error_line(capsys, "settings differ.*ratio")


def test_train_interrupt_before_first_epoch_saves_nothing(tmp_path, monkeypatch, capsys):
    write_tiny_cifar(tmp_path / "data")
    out = tmp_path / "run"
    restore = interrupt_on_call(monkeypatch, 1)
    assert main(train_args(tmp_path / "data", out)) == 130
    restore()
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "is saved" not in err and "--resume" not in err
    assert not out.exists()


def test_report_groups_by_arch_dataset_method_scope(tmp_path, capsys):
    runs = []
    for i, (arch, dataset, method, scope, ratio, acc) in enumerate([
        ("vgg16", "cifar10", "rni", None, 0.0, 0.93), ("resnet56", "cifar10", "rni", None, 0.0, 0.92),
        ("vgg16", "cifar100", "rni", None, 0.0, 0.71), ("vgg16", "cifar10", "rni", "global", 0.5, 0.90),
        ("vgg16", "cifar10", "rni", "local", 0.5, 0.85), ("resnet56", "cifar10", "rni", "global", 0.5, 0.80),
    ]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        summary = {"kind": "prune" if scope else "train", "arch": arch, "dataset": dataset, "method": method,
                   "ratio": ratio, "test_accuracy": acc, "params": 100 - i, "flops": 1000 - i}
        if scope:
            summary.update(scope=scope, accuracy_after_pruning=acc - 0.1, kept_channels=[["a", 8, 4]])
        (d / "summary.json").write_text(json.dumps(summary))
        runs.append(str(d))
    assert main(["report", *runs, "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()[2:]
    keys = [tuple(c.strip() for c in line.strip("|").split("|")[:5]) for line in lines]
    assert keys == [("resnet56", "cifar10", "rni", "-", "0%"), ("resnet56", "cifar10", "rni", "global", "50%"),
                    ("vgg16", "cifar10", "rni", "-", "0%"), ("vgg16", "cifar10", "rni", "global", "50%"),
                    ("vgg16", "cifar10", "rni", "local", "50%"), ("vgg16", "cifar100", "rni", "-", "0%")]
    pytest.importorskip("matplotlib", reason="the plots need matplotlib")
    from rnip_ext.app import plots, report

    rows = report.collect_runs(runs)
    plotted = []
    real_plot = None

    class Ax:
        def __getattr__(self, name):
            return lambda *a, **k: plotted.append(k.get("label")) if name == "plot" else None

    import matplotlib.pyplot as plt

    fig = plt.figure()
    real_plot = plt.subplots
    plt.subplots = lambda *a, **k: (fig, Ax())
    try:
        plots.plot_accuracy_vs_ratio(rows, str(tmp_path / "acc.png"))
    finally:
        plt.subplots = real_plot
    assert sorted(plotted) == ["resnet56 cifar10 rni global", "vgg16 cifar10 rni global", "vgg16 cifar10 rni local",
                               "vgg16 cifar100 rni"]


def test_help_of_every_command_and_version(capsys):
    from rnip_ext.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, _, _ in COMMANDS:
        p = sub.choices[name]
        assert p.description and "``" not in p.description and "\n" not in p.description
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if action.dest in ("help",):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and action.default is not None and not action.required:
                assert "default" in action.help or f"(default: {action.default}" in text, (name, action.dest)
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    from rnip_ext import __version__

    assert capsys.readouterr().out.strip() == f"rnip {__version__}"


def test_demo_output_is_ignored_by_git():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, ".gitignore")
    if not os.path.isfile(path):
        pytest.skip(reason="not a source checkout (no .gitignore)")
    from rnip_ext.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    default = sub.choices["demo"].get_default("out")
    assert f"/{default}/" in open(path).read().splitlines()


def test_demo_small_and_module_entry_point(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn")
    out = tmp_path / "demo"
    demo = ["demo", "--out", str(out), "--seeds", "1", "--epochs", "1", "--finetune-epochs", "0", "--target-flops",
            "0.5", "--threads", "1", "--no-plots"]
    assert main(demo) == 0
    captured = capsys.readouterr()
    text = (out / "report.md").read_text()
    for method in ("rni", "l1", "none"):
        assert f"| {method} | 50% |" in text
    # Not a terminal: one line per stage, no carriage-return progress stream.
    assert "\r" not in captured.out + captured.err
    assert sum(1 for line in captured.out.splitlines() if line.startswith("[") and " train " in line) == 3
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "demo" and "train-rni-s0" in manifest["files"]
    # An earlier demo's output is replaced (by an identical demo: same names, fresh runs).
    assert main(demo + ["--no-progress"]) == 0
    assert "train-rni-s0" in os.listdir(out) and "[" not in capsys.readouterr().out.split("|")[0]

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    capsys.readouterr()
    assert main(["demo", "--out", str(precious), "--epochs", "1", "--no-progress", "--no-plots"]) == 2
    one_error_line(capsys, "thesis.tex")
    # --overwrite never deletes what rnip did not write, and never the current directory.
    assert main(["demo", "--out", str(precious), "--overwrite", "--epochs", "1", "--no-progress", "--no-plots"]) == 2
    one_error_line(capsys, "nothing was deleted")
    assert (precious / "thesis.tex").read_text() == "do not delete"
    monkeypatch.chdir(precious)
    assert main(["demo", "--out", ".", "--overwrite", "--epochs", "1", "--no-progress", "--no-plots"]) == 2
    one_error_line(capsys, "current directory")
    assert main(["demo", "--out", str(tmp_path), "--overwrite", "--epochs", "1", "--no-progress", "--no-plots"]) == 2
    one_error_line(capsys, "current directory or one of its parents")
    assert sorted(os.listdir(precious)) == ["thesis.tex"]

    help_text = subprocess.run([sys.executable, "-m", "rnip_ext", "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "demo" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "rnip_ext", "train", "--out", str(tmp_path / "x"), "--dataset",
                          "cifar10", "--data-dir", str(tmp_path / "nowhere")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


def test_non_finite_loss_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    args = train_args(tmp_path / "data", run)
    args[args.index("--epochs") + 1] = "3"
    real, calls = training.train_epoch, []

    def diverge(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise training.NonFiniteLossError("non-finite training loss (nan, penalty 0)")
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", diverge)
    assert main(args) == 2
    one_error_line(capsys, r"non-finite training loss.*in epoch 2: .*last.pt still holds epoch 1, untouched")
    assert int(load_checkpoint(str(run / "last.pt"))["epoch"]) == 0
    # Diverging in the very first epoch of a new run leaves no directory behind.
    calls.clear()
    calls.append(1)
    assert main(train_args(tmp_path / "data", tmp_path / "fresh")) == 2
    one_error_line(capsys, "nothing of this run was checkpointed")
    assert not (tmp_path / "fresh").exists()


def test_demo_that_fails_before_any_run_leaves_no_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress", "--no-plots"]) == 2
    one_error_line(capsys, "scikit-learn")
    assert not out.exists()


def test_report_without_matplotlib_is_one_error_line(tmp_path, monkeypatch, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"kind": "train", "arch": "vgg16", "dataset": "cifar10",
                                                "method": "rni", "ratio": 0.0, "test_accuracy": 0.9,
                                                "params": 10, "flops": 100}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(d), "--out", str(tmp_path / "rep")]) == 2
    one_error_line(capsys, "plots need matplotlib.*or pass --no-plots")
    assert not (tmp_path / "rep").exists()
    assert main(["report", str(d), "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
