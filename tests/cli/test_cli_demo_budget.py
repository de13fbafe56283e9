"""`rnip demo --target-flops`: the methods compared at equal FLOPs."""

import json

import pytest

from rnip_ext.cli import main


def test_demo_at_equal_flops(tmp_path):
    pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--finetune-epochs", "0", "--target-flops", "0.4",
                 "--no-progress", "--no-plots"]) == 0
    flops = {}
    for method, scope in (("rni", "global"), ("l1", "global"), ("none", "local")):
        summary = json.loads((out / f"prune-{method}-f40" / "summary.json").read_text())
        assert summary["target_flops"] == 0.4 and summary["scope"] == scope
        assert summary["flops"] <= 0.4 * summary["flops_before"]
        flops[method] = summary["achieved_flops"]
    # Equal cost up to one channel's worth: every method lands just under the same budget.
    assert max(flops.values()) - min(flops.values()) < 0.05
    text = (out / "report.md").read_text()
    for method in ("rni", "l1", "none"):
        assert f"| {method} |" in text
    # argparse: one or the other; a refused command leaves no --out behind
    assert main(["demo", "--out", str(tmp_path / "x"), "--ratios", "0.5", "--target-flops", "0.5"]) == 2
    assert not (tmp_path / "x").exists()
