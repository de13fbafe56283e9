"""`rnip train --dataset imagefolder`: streamed from disk with workers, then pruned and reported like any run."""

import json

import pytest

from data_helpers import write_image_folder
from rnip_ext.cli import main


def test_train_prune_report_an_image_folder(tmp_path, capsys):
    write_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    args = ["train", "--arch", "vgg_small", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
            "--image-size", "16", "--mean", "0.4", "0.4", "0.4", "--std", "0.25", "0.25", "0.25", "--workers", "1",
            "--epochs", "3", "--batch-size", "4", "--target-flops", "0.5", "--threads", "1", "--out", str(run),
            "--no-progress"]
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["mean"] == [0.4, 0.4, 0.4] and config["image_size_used"] == 16 and config["threads"] == 1
    assert (config["train_size"], config["val_size"], config["test_size"]) == (18, 6, 6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["achieved_flops"] <= 0.5
    assert main(["prune", str(run), "--ratio", "0.2", "--finetune-epochs", "1", "--workers", "0", "--out",
                 str(tmp_path / "p"), "--no-progress"]) == 0
    assert main(["report", str(run), str(tmp_path / "p"), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    assert "imagefolder" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("extra, match", [
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
    (["--dataset", "imagefolder", "--data-dir", "nowhere"], "no image folder at nowhere"),
    (["--dataset", "cifar10", "--data-dir", "x", "--image-size", "16"], "--image-size applies to imagefolder"),
    (["--mean", "0.5", "0.5", "0.5"], "--mean and --std apply to --dataset imagefolder"),
    (["--dataset", "imagefolder", "--data-dir", "x", "--std", "0", "1", "1"], "--std must be > 0"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_image_folder_options_are_one_line(tmp_path, capsys, extra, match, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--arch", "vgg_small", "--epochs", "1", "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()
