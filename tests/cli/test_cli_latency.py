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


def trained_run(tmp_path, arch: str):
    """A one-epoch `rnip train` run of ``arch`` on a tiny generated CIFAR-10, in ``tmp_path/run``."""
    write_cifar(tmp_path / "data", "cifar10", n_per_file=24)
    run = tmp_path / "run"
    assert main(["train", "--arch", arch, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "--out", str(run),
                 "--no-progress"]) == 0
    return run


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
    run = trained_run(tmp_path, "vgg_small")
    out = tmp_path / "p"
    assert main(["prune", str(run), "--out", str(out), "--no-progress", "--finetune-epochs", "0",
                 "--target-latency", "0.6", "--round-to", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_latency"] == 0.6 and summary["round_to"] == 4
    before, predicted, measured = summary["latency_s"]
    assert 0 < predicted < before and measured is not None
    for name, channels, kept in summary["kept_channels"]:
        assert kept == channels or kept % 4 == 0, (name, channels, kept)
    assert "target_latency=0.6 requested (knapsack)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["latency_rule"] is None  # the default: knapsack
    assert summary["latency_rule"] == "knapsack"
    by_threshold = tmp_path / "p2"
    assert main(["prune", str(run), "--out", str(by_threshold), "--no-progress", "--finetune-epochs", "0",
                 "--target-latency", "0.6", "--round-to", "4", "--latency-rule", "threshold"]) == 0
    assert json.loads((by_threshold / "config.json").read_text())["latency_rule"] == "threshold"
    threshold_summary = json.loads((by_threshold / "summary.json").read_text())
    assert threshold_summary["latency_rule"] == "threshold"
    assert "target_latency=0.6 requested (threshold)" in capsys.readouterr().out
    _, predicted, _ = threshold_summary["latency_s"]
    assert 0 < predicted < before


def test_latency_table_is_saved_then_reused_and_a_foreign_one_refused(tmp_path, capsys):
    run = trained_run(tmp_path, "vgg_small")
    table = tmp_path / "table.json"
    common = ["--no-progress", "--finetune-epochs", "0", "--target-latency", "0.6", "--latency-table", str(table)]
    assert main(["prune", str(run), "--out", str(tmp_path / "p1"), *common]) == 0
    assert "latency table measured and saved to" in capsys.readouterr().out
    saved = table.read_bytes()
    assert json.loads(saved)["latency_table"]
    assert main(["prune", str(run), "--out", str(tmp_path / "p2"), *common]) == 0
    assert "measured and saved" not in capsys.readouterr().out
    assert table.read_bytes() == saved  # reused, never rewritten
    first, second = (json.loads((tmp_path / p / "summary.json").read_text()) for p in ("p1", "p2"))
    assert first["latency_s"][0] == second["latency_s"][0]  # the unpruned time is the table's
    config = json.loads((tmp_path / "p2" / "config.json").read_text())
    assert config["latency_table"] == str(table)

    doc = json.loads(saved)
    doc["key"]["torch"] = "0.0.1"
    table.write_text(json.dumps(doc))
    assert main(["prune", str(run), "--out", str(tmp_path / "p3"), *common]) == 2
    one_error_line(capsys, r"does not fit this model and machine: torch is '0.0.1' in the table")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main(["prune", str(run), "--out", str(tmp_path / "p4"), *common[:-1], str(notes)]) == 2
    one_error_line(capsys, "is not a latency table")
    assert notes.read_text() == '{"mine": 1}'


def test_latency_table_needs_a_latency_target(tmp_path, capsys):
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "p"), "--latency-table", "t.json"]) == 2
    one_error_line(capsys, "--latency-table is used only with --target-latency")
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "p"), "--latency-rule", "threshold"]) == 2
    one_error_line(capsys, "--latency-rule is used only with --target-latency")
    assert main(["prune", str(tmp_path), "--out", str(tmp_path / "p"), "--target-latency", "0.5",
                 "--latency-rule", "greedy"]) == 2
    one_error_line(capsys, "--latency-rule: invalid choice")


def test_residual_streams_option_reaches_the_planner_and_the_records(tmp_path, capsys):
    run = trained_run(tmp_path, "resnet56")
    plain, streams = tmp_path / "plain", tmp_path / "streams"
    for out, extra in ((plain, []), (streams, ["--residual-streams"])):
        assert main(["prune", str(run), "--out", str(out), "--no-progress", "--finetune-epochs", "0",
                     "--target-flops", "0.8", *extra]) == 0
    a, b = (json.loads((p / "summary.json").read_text()) for p in (plain, streams))
    assert a["residual_streams"] is False and b["residual_streams"] is True
    assert json.loads((streams / "config.json").read_text())["residual_streams"] is True
    # resnet56's option-A shortcuts (zero padding) keep its streams whole either way: the same channels go.
    assert a["kept_channels"] == b["kept_channels"]
