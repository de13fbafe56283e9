"""rnip_ext.app.report: reading finished runs, the grouped table, and where it may write."""

import json
import sys

import pytest

from rnip_ext.app import report
from rnip_ext.rundir import OutputDirError


def write_summary(folder, **fields):
    folder.mkdir(parents=True)
    summary = {"kind": "train", "arch": "vgg16", "dataset": "cifar10", "method": "rni", "ratio": 0.0,
               "test_accuracy": 0.9, "params": 10, "flops": 100}
    summary.update(fields)
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_collect_runs_adds_the_folder_and_rejects_what_is_not_a_finished_run(tmp_path):
    good = write_summary(tmp_path / "a", test_accuracy=0.75)
    rows = report.collect_runs([good])
    assert rows[0]["run_dir"] == good and rows[0]["test_accuracy"] == 0.75
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no summary.json"):
        report.collect_runs([good, str(tmp_path / "empty")])
    pruned = write_summary(tmp_path / "p", kind="prune", ratio=0.5, scope="global")  # no kept_channels
    with pytest.raises(ValueError, match="lacks accuracy_after_pruning, kept_channels"):
        report.collect_runs([pruned])
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a run summary"):
        report.collect_runs([str(tmp_path / "list")])


def test_report_table_orders_rows_within_their_group(tmp_path):
    rows = [
        dict(kind="prune", arch="vgg16", dataset="cifar10", method="rni", scope="local", ratio=0.7,
             test_accuracy=0.8, accuracy_after_pruning=None, params=5, flops=50),
        dict(kind="prune", arch="vgg16", dataset="cifar10", method="rni", scope="local", ratio=0.3,
             test_accuracy=0.85, accuracy_after_pruning=0.5, params=7, flops=70),
        dict(kind="train", arch="vgg16", dataset="cifar10", method="rni", ratio=0.0, test_accuracy=0.9,
             params=10, flops=1000),
    ]
    lines = report.report_table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[3:5] for c in cells] == [["-", "0%"], ["local", "30%"], ["local", "70%"]]
    assert cells[1][5:7] == ["85.00", "50.00"] and cells[2][6] == ""
    assert cells[0][8] == "1,000"


def test_make_report_fails_before_writing_without_matplotlib(tmp_path, monkeypatch):
    run = write_summary(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "rep"
    with pytest.raises(ImportError, match="plots need matplotlib"):
        report.make_report([run], str(out))
    assert not out.exists()
    assert report.make_report([run], str(out), plots=False) == {}
    assert (out / "report.md").read_text().count("| vgg16 |") == 1
    assert json.loads((out / "report.json").read_text())[0]["run_dir"] == run


def test_make_report_writes_only_where_it_may(tmp_path):
    run = write_summary(tmp_path / "run")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError):
        report.make_report([run], str(foreign), plots=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(OutputDirError):
        report.make_report([run], run, plots=False)  # into a run it reads
    out = tmp_path / "rep"
    report.make_report([run], str(out), plots=False)
    report.make_report([run], str(out), plots=False)  # an earlier report is replaced
    assert (out / "report.md").exists()


def test_unreadable_checkpoint_fails_before_an_earlier_report_is_replaced(tmp_path):
    pytest.importorskip("matplotlib", reason="the importance histogram needs matplotlib")
    run = write_summary(tmp_path / "run")  # a trained run with no config.json or best.pt
    out = tmp_path / "rep"
    report.make_report([run], str(out), plots=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(report.RunReadError, match="run cannot be read"):
        report.make_report([run], str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
