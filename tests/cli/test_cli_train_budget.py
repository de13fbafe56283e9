"""`rnip train --target-flops`: one run to a FLOPs budget on the digits, resumable, accepted by prune and report."""

import json

import pytest

from rnip_ext.cli import main
from rnip_ext.rundir import load_checkpoint
from rnip_ext.pruning import count_flops, restore

from rnip_ext import training


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def one_error_line(capsys, match):
    """stderr holds exactly one line, ``error: ...`` matching ``match`` (no traceback)."""
    import re

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]


def interrupt_on_call(monkeypatch, n):
    """Ctrl-C at the start of the n-th epoch; returns the undo."""
    real, calls = training.train_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train_epoch", interrupted)
    return lambda: monkeypatch.setattr(training, "train_epoch", real)


def budget_args(out, *extra, epochs="4"):
    return ["train", "--arch", "vgg_small", "--dataset", "digits", "--epochs", epochs, "--batch-size", "128",
            "--lr", "0.05", "--target-flops", "0.25", "--out", str(out), "--no-progress", *extra]


def _model_of(run):
    from rnip_ext.app.runs import build_model

    config = json.loads((run / "config.json").read_text())
    return config, build_model(config, config["num_classes"], config["in_channels"])


def test_budget_run_interrupted_resumed_then_pruned_and_reported(tmp_path, monkeypatch, capsys):
    import torch

    run = tmp_path / "run"
    args = budget_args(run)
    restore_train = interrupt_on_call(monkeypatch, 3)  # Ctrl-C in the third epoch, the network narrowed
    assert main(args) == 130
    restore_train()
    capsys.readouterr()
    last = load_checkpoint(str(run / "last.pt"))
    assert int(last["epoch"]) == 1 and last["architecture"] and last["regularizer"]["original"] > 0
    assert last["regularizer"]["steps_done"] == 2
    assert main(args + ["--resume"]) == 0
    config, fresh = _model_of(run)
    assert config["target_flops"] == 0.25 and config["receding"] == "decoupled" and config["receded_below"] == 0.01
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("params", "flops", "flops_fraction", "channels", "strength", "wall_seconds", "test_accuracy"):
        assert all(key in r for r in rows), key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops"] <= 0.25 * config["flops"] and summary["achieved_flops"] <= 0.25
    assert summary["flops_before"] == config["flops"] and 0 < summary["ratio"] < 1
    # The checkpoint's architecture is the final network's.
    example = torch.zeros(1, config["in_channels"], config["image_size_used"], config["image_size_used"])
    last = load_checkpoint(str(run / "last.pt"))
    final = restore(fresh, last["model"], last["architecture"])
    assert count_flops(final, example) == summary["flops"] == rows[-1]["flops"]
    assert rows[-1]["channels"] == {k[0]: k[2] for k in summary["kept_channels"]}
    assert (run / "budget_training.png").stat().st_size > 1000

    pruned = tmp_path / "pruned"
    assert main(["prune", str(run), "--ratio", "0.2", "--finetune-epochs", "0", "--out", str(pruned),
                 "--no-progress"]) == 0
    ps = json.loads((pruned / "summary.json").read_text())
    assert ps["flops_before"] == summary["flops"] and ps["flops"] < summary["flops"]
    report = tmp_path / "report"
    assert main(["report", str(run), str(pruned), "--out", str(report)]) == 0
    assert "| vgg_small | digits | rni |" in (report / "report.md").read_text()
    assert (report / "importance_histogram.png").exists()


@pytest.mark.parametrize("extra, match", [
    (["--target-flops", "0"], r"--target-flops must be in \(0, 1\]"),
    (["--target-flops", "1.5"], r"--target-flops must be in \(0, 1\]"),
    (["--receded-below", "1"], r"--receded-below must be in \(0, 1\)"),
    (["--receded-below", "0"], r"--receded-below must be in \(0, 1\)"),
    (["--target-flops", "0.0001", "--epochs", "30"], "target_flops=0.0001 cannot be met.*min_channels=3"),
    (["--method", "l1"], "needs --method rni"),
    (["--epochs", "1"], "epochs must be an int >= 2"),
    (["--target-flops", "0.02", "--epochs", "3"], "3 steps are too few to reach 0.02"),
    (["--receding", "adam"], "invalid choice: 'adam'"),
])
def test_bad_budget_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert main(budget_args(out, *extra)) == 2
    one_error_line(capsys, match)
    assert not out.exists()


def test_budget_options_without_target_are_refused(tmp_path, capsys):
    args = [a for a in budget_args(tmp_path / "run") if a not in ("--target-flops", "0.25")]
    assert main(args + ["--receding", "loss"]) == 2
    one_error_line(capsys, "need --target-flops")


def test_a_budget_run_of_an_older_version_is_refused_clearly(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(budget_args(run, epochs="3", *["--target-flops", "0.5"])) == 0
    capsys.readouterr()
    import torch

    last = load_checkpoint(str(run / "last.pt"))
    old = {k: v for k, v in last.items() if k not in ("format", "callbacks")}
    old["callback"] = {"original_flops": 1, "history": []}  # what the older BudgetPruning stored
    torch.save(old, run / "last.pt")
    config = json.loads((run / "config.json").read_text())
    config["epochs"] = 4
    (run / "config.json").write_text(json.dumps(config))
    assert main(budget_args(run, "--resume", epochs="4", *["--target-flops", "0.5"])) == 2
    one_error_line(capsys, "cannot resume .*budget run of an older rnip_ext")
