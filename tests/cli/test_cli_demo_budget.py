"""`rnip demo`: the methods compared at equal FLOPs (and the budget-aware run), argument errors as one line."""

import json

import pytest

from rnip_ext.cli import main


def test_demo_at_equal_flops(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "1", "--epochs", "3", "--finetune-epochs", "0",
                 "--target-flops", "0.5", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    flops = {}
    for method, scope in (("rni", "global"), ("l1", "global"), ("none", "local")):
        summary = json.loads((out / f"prune-{method}-s0-f50" / "summary.json").read_text())
        assert summary["target_flops"] == 0.5 and summary["scope"] == scope
        assert summary["flops"] <= 0.5 * summary["flops_before"]
        flops[method] = summary["achieved_flops"]
    # Equal cost up to one channel's worth: every method lands just under the same budget.
    assert max(flops.values()) - min(flops.values()) < 0.05
    text = (out / "report.md").read_text()
    assert text.strip() in printed  # the table printed is the table written
    for method in ("rni", "l1", "none"):
        assert f"| {method} | unpruned |" in text and f"| {method} | 50% |" in text
    # The budget-aware run: one training run to the budget, its own row, no fine-tuning.
    budget = json.loads((out / "train-rni-budget-s0-f50" / "summary.json").read_text())
    assert budget["flops"] <= 0.5 * budget["flops_before"] and 0 < budget["training_compute"] < 1
    assert "| rni-budget | 50% |" in text and "| rni-budget | unpruned |" not in text
    # The default --threads 1 (robust on a busy machine) is what the report records.
    assert json.loads((out / "report.json").read_text())["machine"]["torch_threads"] == 1
    # Not a terminal: one line per stage, no progress bars.
    assert sum(1 for line in printed.splitlines() if line.startswith("[")) == 7 and "\r" not in printed


@pytest.mark.parametrize("args, match", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--target-flops", "0"], "--target-flops must be in"),
    (["--target-flops", "0.5", "0.501"], "--target-flops must differ"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "many"], "--threads must be a number >= 1 or 'auto'"),
    (["--ratios", "0.5"], "unrecognized arguments"),
])
def test_demo_argument_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, match):
    out = tmp_path / "x"
    assert main(["demo", "--out", str(out), "--no-plots", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert not out.exists()
