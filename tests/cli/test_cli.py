"""The `rnip` command end to end on tiny generated CIFAR-format data and on the digits."""

import json
import subprocess
import sys

import pytest
import torch

from data_helpers import write_cifar
from rnip_ext.cli import main
from rnip_ext.cli.runs import load_checkpoint



def write_tiny_cifar(root):
    write_cifar(root, "cifar10", n_per_file=24)


def train_args(data_dir, out, *extra):
    return ["train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir", str(data_dir), "--epochs", "1",
            "--batch-size", "16", "--val-fraction", "0.2", "--out", str(out), "--no-progress", *extra]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_interrupt_resume_prune_report(tmp_path, monkeypatch):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    args = train_args(tmp_path / "data", run)
    args[args.index("--epochs") + 1] = "2"

    # Ctrl-C during the second epoch: the first epoch's checkpoint survives and is resumable.
    import rnip_ext.cli.train as train_module

    real_train_epoch, calls = train_module.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_epoch(*a, **k)

    monkeypatch.setattr(train_module, "train_epoch", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 130
    monkeypatch.setattr(train_module, "train_epoch", real_train_epoch)

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "rni" and config["bn"] == "bounded"
    assert config["strength"] == 1e-3 and config["shift"] == 3.0  # the paper's VGG settings
    assert config["versions"]["torch"] == torch.__version__
    assert config["train_size"] == 96 and config["val_size"] == 24 and config["test_size"] == 24
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1] and 0 <= rows[0]["val_accuracy"] <= 1 and rows[0]["penalty"] > 0
    last = load_checkpoint(str(run / "last.pt"))
    assert int(last["epoch"]) == 0
    assert not (run / "summary.json").exists()

    # A second invocation without --resume must not clobber the run.
    with pytest.raises(SystemExit, match="already holds a run"):
        main(args)
    # Resuming with different settings is refused (the schedule depends on --epochs too) ...
    with pytest.raises(SystemExit, match="settings differ.*method"):
        main(args + ["--method", "l1", "--resume"])
    changed_epochs = list(args)
    changed_epochs[changed_epochs.index("--epochs") + 1] = "3"
    with pytest.raises(SystemExit, match="settings differ.*epochs"):
        main(changed_epochs + ["--resume"])
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
    assert "| rni | 0% |" in text and "| rni | 50% |" in text
    for name in ("importance_histogram", "accuracy_vs_ratio", "kept_channels"):
        assert (report / f"{name}.png").stat().st_size > 1000


def test_corrupt_checkpoint_is_reported_and_nothing_is_lost(tmp_path):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    main(train_args(tmp_path / "data", run))
    metrics_before = (run / "metrics.jsonl").read_text()
    (run / "last.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SystemExit, match="cannot resume.*corrupt"):
        main(train_args(tmp_path / "data", run, "--resume"))
    assert (run / "metrics.jsonl").read_text() == metrics_before
    assert (run / "best.pt").exists() and (run / "config.json").exists()


def test_mixed_precision_and_channels_last_train(tmp_path):
    write_tiny_cifar(tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_args(tmp_path / "data", run, "--amp", "bf16", "--channels-last", "--method", "l1")) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["amp"] == "bf16" and config["channels_last"] and config["bn"] == "plain"
    assert config["strength"] == 1e-4  # network slimming's VGG setting
    state = load_checkpoint(str(run / "best.pt"))["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # master weights stay fp32


def test_download_without_torchvision_says_where_to_get_the_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on a machine without it
    with pytest.raises(RuntimeError, match=r"torchvision.*cifar-10-python.tar.gz"):
        main(train_args(tmp_path / "data", tmp_path / "run", "--download"))


def test_validation_split_is_required_for_model_selection(tmp_path):
    write_tiny_cifar(tmp_path / "data")
    with pytest.raises(SystemExit, match="--val-fraction must be in"):
        main(train_args(tmp_path / "data", tmp_path / "run", "--val-fraction", "0"))


def test_missing_data_dir_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        main(train_args(tmp_path / "nowhere", tmp_path / "run"))
    with pytest.raises(SystemExit):
        main(["train", "--arch", "alexnet", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a finished"):
        main(["prune", str(tmp_path / "nothing"), "--out", str(tmp_path / "p")])
    with pytest.raises(SystemExit, match="--ratio must be in"):
        main(["prune", str(tmp_path), "--ratio", "1.0", "--out", str(tmp_path / "p")])


def test_demo_small_and_module_entry_point(tmp_path):
    pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--finetune-epochs", "0", "--ratios", "0.5",
                 "--no-progress", "--no-plots"]) == 0
    text = (out / "report.md").read_text()
    for method in ("rni", "l1", "none"):
        assert f"| {method} | 50% |" in text
    assert (out / ".rnip-demo").is_file()  # so the next demo may replace this folder
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(SystemExit, match="not a demo output"):
        main(["demo", "--out", str(precious), "--epochs", "1", "--no-progress", "--no-plots"])
    assert (precious / "thesis.tex").read_text() == "do not delete"
    help_text = subprocess.run([sys.executable, "-m", "rnip_ext", "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "demo" in help_text.stdout
