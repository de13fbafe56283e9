"""benchmarks/budget_training.py on a tiny setting: every arm runs and reports (no accuracy asserted)."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def test_every_arm_runs_on_a_tiny_setting(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn")
    monkeypatch.syspath_prepend(BENCH)
    import budget_training

    out = tmp_path / "bt.json"
    payload = budget_training.main(["--epochs", "6", "--finetune", "1", "--seeds", "0", "--budgets", "0.5",
                                    "--train-size", "128", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == payload["summary"]
    methods = {r["method"] for r in payload["runs"]}
    assert {"cut", "budget", "budget-loss", "adamw", "adamw-loss", "pretrained"} <= methods
    assert {f"tpf-{r}-{s}" for r in ("rni", "l1", "none") for s in ("global", "local")} <= methods
    for r in payload["runs"]:
        assert r["achieved_flops"] <= 0.5 + 1e-9 and 0 <= r["final_test_accuracy"] <= 1, r["method"]
    pretrained = next(r for r in payload["runs"] if r["method"] == "pretrained")
    # A third of the epochs (at least 3) after the plain training, which counts into the compute.
    assert pretrained["epochs"] == 3 and pretrained["training_compute"] > 1
    assert 0 <= pretrained["converted_test_accuracy"] <= 1
    budget = next(r for r in payload["runs"] if r["method"] == "budget")
    assert budget["training_compute"] < 1 and budget["receded_channels"] + budget["forced_channels"] > 0
    assert os.path.exists(tmp_path / "bt.png")


def test_the_time_limit_stops_starting_runs(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn")
    monkeypatch.syspath_prepend(BENCH)
    import budget_training

    payload = budget_training.main(["--epochs", "3", "--seeds", "0", "--budgets", "0.5", "--methods", "budget",
                                    "adamw", "--train-size", "64", "--time-limit", "0", "--out",
                                    str(tmp_path / "bt.json")])
    assert payload["runs"] == [] and payload["settings"]["stopped_by_time_limit"]
