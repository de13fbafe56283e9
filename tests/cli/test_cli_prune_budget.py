"""`rnip prune` to a FLOPs/parameter budget, with the measured speed before and after."""

import json
import re

import pytest

from data_helpers import write_cifar
from rnip_ext.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    write_cifar(root / "data", "cifar10", n_per_file=24)
    run = root / "run"
    assert main(["train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir", str(root / "data"),
                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "--out", str(run),
                 "--no-progress"]) == 0
    return run


def prune(run, out, *flags):
    return main(["prune", str(run), *flags, "--finetune-epochs", "0", "--out", str(out), "--no-progress"])


@pytest.mark.parametrize("flag,key", [("--target-flops", "flops"), ("--target-params", "params")])
def test_prune_to_a_target(trained_run, tmp_path, capsys, flag, key):
    out = tmp_path / "pruned"
    assert prune(trained_run, out, flag, "0.4") == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary[f"target_{key}"] == 0.4 and config[f"target_{key}"] == 0.4 and config["ratio"] is None
    assert summary[key] <= 0.4 * summary[f"{key}_before"]
    assert summary[f"achieved_{key}"] == pytest.approx(summary[key] / summary[f"{key}_before"])
    assert summary["ratio"] == summary["achieved_ratio"] > 0
    assert summary["images_per_s_before"] > 0 and summary["images_per_s_after"] > 0
    assert summary["speed_batch_size"] == 16 and summary["speed_device"] == "cpu"
    printed = capsys.readouterr().out
    assert f"target_{key}=0.4 requested" in printed
    assert "measured speed (rough: median of 5 batches of 16" in printed and "images/s" in printed


def test_default_is_half_the_channels(trained_run, tmp_path):
    out = tmp_path / "pruned"
    assert prune(trained_run, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ratio"] == 0.5 and summary["target_flops"] is None and summary["target_params"] is None


def test_bad_budgets(trained_run, tmp_path, capsys):
    def one_error(pattern):
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(pattern, err), err

    assert prune(trained_run, tmp_path / "a", "--ratio", "0.5", "--target-flops", "0.5") == 2  # exclusive
    one_error("not allowed with argument")
    assert prune(trained_run, tmp_path / "b", "--target-flops", "0") == 2
    one_error(r"--target-flops must be in \(0, 1\], got 0.0")
    assert prune(trained_run, tmp_path / "c", "--target-params", "1.5") == 2
    one_error(r"--target-params must be in \(0, 1\], got 1.5")
    assert prune(trained_run, tmp_path / "d", "--target-flops", "1e-6") == 2
    one_error(r"target_flops=1e-06 cannot be met.*smallest reachable")
    # A refused command leaves no --out behind.
    assert not any((tmp_path / n).exists() for n in "abcd")
