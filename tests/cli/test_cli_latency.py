"""`rnip prune --target-latency` / `--round-to`: bad values give one `error:` line; a run prunes to a latency."""

import json

import pytest

from data_helpers import write_cifar
from rnip_ext.cli import main


def one_error_line(capsys, match):
    """stderr holds exactly one line, ``error: ...`` matching ``match`` (no traceback)."""
    import re

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]


@pytest.mark.parametrize("extra,match", [
    (["--target-latency", "0"], r"--target-latency must be in \(0, 1\]"),
    (["--target-latency", "1.5"], r"--target-latency must be in \(0, 1\]"),
    (["--target-latency", "nan"], "--target-latency must be"),
    (["--target-latency", "0.5", "--scope", "local"], "--scope must be global"),
    (["--round-to", "0"], "--round-to must be >= 1"),
])
def test_bad_latency_options(tmp_path, capsys, extra, match):
    out = tmp_path / "p"
    assert main(["prune", str(tmp_path / "run"), "--out", str(out), "--no-progress", *extra]) == 2
    one_error_line(capsys, match)
    assert not out.exists()


def test_latency_and_flops_targets_are_exclusive(tmp_path, capsys):
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "p"), "--target-latency", "0.5",
                 "--target-flops", "0.5"]) == 2
    one_error_line(capsys, "--target-flops: not allowed with argument --target-latency")


def test_prune_to_a_latency(tmp_path, capsys):
    write_cifar(tmp_path / "data", "cifar10", n_per_file=24)
    run = tmp_path / "run"
    assert main(["train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "--out", str(run),
                 "--no-progress"]) == 0
    out = tmp_path / "p"
    assert main(["prune", str(run), "--out", str(out), "--no-progress", "--finetune-epochs", "0",
                 "--target-latency", "0.6", "--round-to", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_latency"] == 0.6 and summary["round_to"] == 4
    before, predicted, measured = summary["latency_s"]
    assert 0 < predicted < before and measured is not None
    for name, channels, kept in summary["kept_channels"]:
        assert kept == channels or kept % 4 == 0, (name, channels, kept)
    assert "target_latency=0.6 requested" in capsys.readouterr().out
